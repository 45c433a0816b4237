"""Lightning training: DataModule, LightningModules, losses and augmentation."""

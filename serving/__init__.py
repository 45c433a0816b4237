"""BentoML service for the @champion soundline model (see serving/service.py)."""

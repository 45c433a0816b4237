"""Run Great Expectations (1.x) suites over in-memory tables and report failures by name.

The validation stages build pandas tables (one row per file, per class, ...) and a list of
expectations for each; this module runs them in one checkpoint, writes Data Docs HTML, and
returns a summary that names every failing expectation and the rows (files) that broke it.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.expectations import Expectation

# Offending rows listed per failing expectation in the console summary; the JSON keeps all.
_SHOWN = 10


@dataclass(frozen=True)
class Table:
    """A table to validate: its rows, the column that names a row, and its expectations.

    ``context`` columns are shown beside each offending row (e.g. the decode error).
    """

    frame: pd.DataFrame
    id_column: str
    expectations: list[Expectation]
    context: tuple[str, ...] = ()


@dataclass
class Failure:
    table: str
    expectation: str
    column: str | None
    detail: str
    offending: list[str] = field(default_factory=list)


@dataclass
class SuiteReport:
    suite: str
    success: bool
    evaluated: int
    failures: list[Failure]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def summary(self) -> str:
        """Short human summary: one line per failing expectation and its first offenders."""
        head = f"{self.suite}: {self.evaluated - len(self.failures)}/{self.evaluated} expectations passed"
        lines = [head]
        for f in self.failures:
            where = f"{f.table}.{f.column}" if f.column else f.table
            lines.append(f"  FAILED {f.expectation} on {where}: {f.detail}")
            for row in f.offending[:_SHOWN]:
                lines.append(f"    - {row}")
            if len(f.offending) > _SHOWN:
                lines.append(f"    ... and {len(f.offending) - _SHOWN} more")
        return "\n".join(lines)


def _describe(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("column", "batch_id") and v is not None}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def validate(suite: str, tables: dict[str, Table], docs_dir: Path) -> SuiteReport:
    """Validate every table with its expectations; write Data Docs to ``docs_dir``.

    ``docs_dir`` is replaced as a whole, so the HTML always shows this run only.
    """
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    context.add_data_docs_site(site_name="local", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas(suite)
    failures: list[Failure] = []
    evaluated = 0
    for name, table in tables.items():
        definition = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name)
        gx_suite = context.suites.add(gx.ExpectationSuite(name=f"{suite}.{name}"))
        for expectation in table.expectations:
            gx_suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite}.{name}", data=definition, suite=gx_suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{suite}.{name}", validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE",
                           "unexpected_index_column_names": [table.id_column, *table.context]},
        ))
        result = checkpoint.run(batch_parameters={"dataframe": table.frame.reset_index(drop=True)})
        for run in result.run_results.values():
            for item in run.results:
                evaluated += 1
                if not item.success:
                    failures.append(_failure(name, table.id_column, item))
    return SuiteReport(suite=suite, success=not failures, evaluated=evaluated, failures=failures)


def _failure(table: str, id_column: str, item) -> Failure:
    config = item.expectation_config
    result = item.result or {}
    offending = []
    for row in result.get("unexpected_index_list") or []:
        ident = row.get(id_column)
        values = {k: v for k, v in row.items() if k != id_column}
        offending.append(f"{ident} ({', '.join(f'{k}={v}' for k, v in values.items())})")
    detail = _describe(config.kwargs)
    if "observed_value" in result:
        detail += f"; observed {result['observed_value']}"
    elif "unexpected_count" in result:
        detail += f"; {result['unexpected_count']} of {result.get('element_count')} rows"
    if item.exception_info and item.exception_info.get("raised_exception"):
        detail += f"; error: {item.exception_info.get('exception_message')}"
    return Failure(table=table, expectation=config.type, column=config.kwargs.get("column"),
                   detail=detail, offending=offending)

"""Options and arguments shared by the pipeline's commands (declared once; see :mod:`pipeline.cli.ops` and :mod:`pipeline.cli.run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Argument(help="Registered model name.")]
Version = Annotated[str, typer.Argument(help="Version number or alias (challenger, @champion…).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (its folder is the project root).")]
TrackingUri = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else params.yaml).")]
AuditUrl = Annotated[Optional[str], typer.Option("--audit-url", help="Audit log database URL (default: TASKVEC_AUDIT_URL, else beside the tracking store).")]
Approver = Annotated[str, typer.Option("--approver", help="Who decides (recorded in the audit log and the version's tags).")]
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log and the version's tags).")]
SetParam = Annotated[Optional[list[str]], typer.Option("--set-param", "-S", metavar="KEY.PATH=VALUE", help="Override a params value for this command (repeatable), as `taskvec run -S`: e.g. -S eval.max_rows.validation=64.")]

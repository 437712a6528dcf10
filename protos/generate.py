"""Generate Python code and type stubs from protos/ into common/gen/.

protoc writes imports such as ``from webhooks.v1 import event_pb2``, which only
work if ``webhooks`` is a top-level package. Our generated tree lives inside
``common.gen``, so every generated import is rewritten to the fully qualified
``common.gen.webhooks.v1`` path. The output is rebuilt from scratch each time so
that a removed proto never leaves a stale module behind.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "common" / "gen"
PACKAGE = "common.gen"

# `from webhooks.v1 import x_pb2` and `import webhooks.v1.x_pb2` (stubs use the latter).
_FROM_IMPORT = re.compile(r"^from (webhooks\.\S+) import ", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^import (webhooks\.\S+)", re.MULTILINE)
_QUALIFIED_USE = re.compile(r"(?<![\w.])(webhooks\.v1\.\w+_pb2)")


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    # The mypy plugins are console scripts beside this interpreter.
    os.environ["PATH"] = (
        f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code: int = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            f"--mypy_out={OUT}",
            f"--mypy_grpc_out={OUT}",
            *protos,
        ]
    )
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return code
    for path in sorted(OUT.rglob("*.py*")):
        text = path.read_text()
        text = _FROM_IMPORT.sub(rf"from {PACKAGE}.\1 import ", text)
        text = _PLAIN_IMPORT.sub(rf"import {PACKAGE}.\1", text)
        if path.suffix == ".pyi":
            text = _QUALIFIED_USE.sub(rf"{PACKAGE}.\1", text)
        path.write_text(text)
    for directory in [OUT, *(d for d in OUT.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    (OUT / "py.typed").touch()
    print(f"generated {len(protos)} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

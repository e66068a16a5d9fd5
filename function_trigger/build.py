"""``python -m function_trigger.build OUTDIR``: write the function's build directory, the
one ``fn deploy`` (or an OCI DevOps build) makes the function image from.

It holds the function's own files and, beside them, ``contract.py`` copied from
``diskimport/contract.py``: the rules the function shares with the flow. In the repository
the function's modules import ``diskimport.contract`` and each other by package; in the
build directory they sit side by side, so the build rewrites those imports to plain names
(``from contract import ...``), and the image needs nothing else of this repository.
Standard library only.

OUTDIR is replaced as a whole on each build (stale files never reach an image); a
directory that is not empty and was not written by this build is left alone and refused.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTRACT = HERE.parent / "diskimport" / "contract.py"
FILES = ("func.py", "trigger.py", "func.yaml", "requirements.txt", "README.md")
MARKER = ".function-build"  # names a directory this module wrote, so a rebuild may replace it
# Each module's package imports, as the flat build directory has them.
FLAT_IMPORTS = {
    "func.py": ("from function_trigger.trigger import", "from trigger import"),
    "trigger.py": ("from diskimport.contract import", "from contract import"),
}


def build(out: Path) -> Path:
    """Write the build directory at ``out`` (replacing an earlier build there); return it."""
    out = Path(out).resolve()
    if out.exists():
        if out.is_dir() and (not any(out.iterdir()) or (out / MARKER).exists()):
            shutil.rmtree(out)
        else:
            raise FileExistsError(f"{out} exists and is not a function build directory; choose another")
    out.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(HERE / name, out / name)
        if name in FLAT_IMPORTS:
            package_import, flat_import = FLAT_IMPORTS[name]
            source = (HERE / name).read_text()
            if source.count(package_import) != 1:
                raise RuntimeError(f"{name} must import {package_import!r} exactly once for the build to flatten it")
            (out / name).write_text(source.replace(package_import, flat_import))
    shutil.copy2(CONTRACT, out / "contract.py")
    (out / MARKER).write_text("written by python -m function_trigger.build; replaced by the next build\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m function_trigger.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="the build directory to write, e.g. build/function")
    args = parser.parse_args(argv)
    try:
        out = build(args.outdir)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(f"function build directory: {out} (deploy: cd {out} && fn deploy --app <app>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The core is Sans-I/O: importing every dispatch module pulls in no I/O framework."""

import subprocess
import sys

FORBIDDEN = ["ray", "asyncpg", "redis", "fastapi", "uvicorn", "websockets", "asyncio"]


def test_dispatch_imports_no_io_frameworks():
    code = (
        "import pkgutil, importlib, sys, dispatch\n"
        "for m in pkgutil.walk_packages(dispatch.__path__, 'dispatch.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [n for n in {FORBIDDEN!r} if n in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dispatch imported {out.stdout.strip()}"

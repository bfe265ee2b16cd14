"""The launchers (server.run, client.run) live as long as the federation: they check their input without torch,
so each stays ~0.1 GB instead of ~0.6 GB (docs/benchmarks.md, issue 13)."""

import subprocess
import sys
import textwrap


def test_launchers_check_config_and_slides_without_importing_torch(tmp_path):
    (tmp_path / "tiles").mkdir()
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import client.run, server.run
        server.run.check_config('lae-rounds=2 transfer-dtype="bf16" memorisation-samples=16')
        args = client.run.parse(["--data", {str(tmp_path / "tiles")!r}, "--superlink", "127.0.0.1:1", "--insecure"])
        client.run.prepare_slides(args, Path({str(tmp_path / "work")!r}))
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"

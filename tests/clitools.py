"""`run_main(capsys, *args)`: the `mcsae` command run in the test's own process, for tests that drive the CLI."""
from mcsae.cli import main


def run_main(capsys, *args) -> tuple[int, str, str]:
    "Run `mcsae ARGS` through the CLI's main() in this process: (exit code, stdout, stderr)."
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else repr(e.code))
    out, err = capsys.readouterr()
    return code, out, err

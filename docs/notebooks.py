"""Execute mcsae's notebooks, store their outputs, and check that the stored outputs are still true.

    python docs/notebooks.py store [NB ...] [--n_workers 2]   # execute in place and keep the outputs (`make outputs`)
    python docs/notebooks.py check [NB ...] [--n_workers 2]   # re-execute; fail on an exception or a stale output
                                     [--flags 'slow']         # also run the cells flagged slow (as nbdev_test --flags)

Without NB arguments both take the documentation notebooks: every `nbs/*.ipynb` (sorted by name, `index.ipynb`
included, names starting with `_` or `.` left out), the set `nbdev_test` runs with `recursive = False`.

Cells are executed the way `nbdev_test` executes them (execnb's CaptureShell in the notebook's folder, with
`IN_TEST=1`): a cell carrying one of the `tst_flags` of settings.ini (`#| notest`, `#| slow`, `#| gpu`), an
`#| eval: false` cell and the `nbdev_export()` cell are not run, and keep no output. `check` fails on the first
exception, as `nbdev_test` does, so `make test` runs it instead of `nbdev_test` and executes each notebook once.

Outputs are made deterministic before they are stored or compared: each notebook runs in a fresh interpreter with
PYTHONHASHSEED=0, `random`, numpy and torch seeded with 0 and torch on one thread (the same float sums on every
machine); memory addresses (`<X at 0x7f…>`, `0x7f3a9c…`), progress-bar rates and times, `%time` lines and local
paths (the checkout, site-packages, the home and temp folders) are replaced by fixed placeholders. The result is
cleaned with nbdev_clean's own function, so `nbdev_clean` leaves a stored notebook unchanged.

What `check` compares, per code cell: the stdout text and the `text/*` data (text/plain, text/markdown, text/html,
text/latex) of results and displays. It does not compare
* image bytes: a PNG depends on the matplotlib, FreeType and font versions, so bytes that differ between two
  machines do not mean the documentation lies; `check` only requires an image where one is stored (and not
  where none is), and a figure's text/plain (`<Figure size 640x480 with 2 Axes>`) is compared like any text;
* stderr: warnings and progress bars, whose wording depends on library versions; it is stored (normalised) for
  the reader but not compared.
A cell marked `#| volatile` (a timing, clearly labelled in the text as one machine's measurement) is run and its
output stored, but never compared.
Refresh stale outputs with `make outputs` (or `make docs`, which also renders the site) and commit the notebooks.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
INDEX_NB = "index.ipynb"
REFRESH = "make outputs"
STALE = 3  # a child's exit status for stale outputs (2: a cell raised; 1 would be an uncaught error in the tool)
VOLATILE = "volatile"  # `#| volatile`: a cell whose output is one machine's measurement; stored, never compared

# Run in the notebook's shell before its first cell; not stored.
PRELUDE = """\
import random as _r; _r.seed(0)
try:
    import numpy as _np; _np.random.seed(0)
except ImportError:
    pass
try:
    import torch as _t; _t.manual_seed(0); _t.set_num_threads(1)
except ImportError:
    pass
del _r
"""


def notebooks(nbs: Path = NBS) -> list[Path]:
    "The documentation notebooks: nbs/*.ipynb sorted by name, hidden (`_`, `.`) ones left out."
    return sorted(p for p in nbs.glob("*.ipynb") if not p.name.startswith(("_", ".")))


def chapters(nbs: Path = NBS) -> list[Path]:
    "The chapters in reading order: the documentation notebooks except the home page `index.ipynb`."
    return [p for p in notebooks(nbs) if p.name != INDEX_NB]


# ---------------------------------------------------------------- normalisation

def _path_subs() -> list[tuple[str, str]]:
    "Local paths and their placeholders, longest first (site-packages lies under the prefix, the checkout maybe under home)."
    paths = {str(ROOT): "<repo>", sysconfig.get_paths()["purelib"]: "<site-packages>",
             sysconfig.get_paths()["stdlib"]: "<stdlib>", sys.prefix: "<python>",
             os.path.expanduser("~"): "~"}
    return sorted(((p, s) for p, s in paths.items() if len(p) > 1), key=lambda ps: -len(ps[0]))


_PATHS = _path_subs()
_TMP = re.escape(tempfile.gettempdir())
_SUBS = [
    (re.compile(r"(<[^<>]*?) at 0x[0-9a-fA-F]+(>)"), r"\1\2"),                      # object reprs, as nbdev_clean does
    (re.compile(r"\b0x[0-9a-fA-F]{8,}\b"), "0x…"),                                  # other addresses
    (re.compile(_TMP + r"/(tmp|pytest-of-)[\w.-]+"), "<tmp>"),                      # a temporary folder of the run
    (re.compile(r"\d+(?:\.\d+)?\s*([A-Za-z]+/s|s/[A-Za-z]+)\b"), r"… \1"),          # progress-bar rates (it/s, examples/s)
    (re.compile(r"\d+:\d\d(?::\d\d)?<(?:\d+:\d\d(?::\d\d)?|\?)"), "…<…"),           # progress-bar elapsed<remaining
    (re.compile(r"\[\d+:\d\d(?::\d\d)?,"), "[…,"),                                  # progress-bar elapsed alone
    (re.compile(r"^(CPU times|Wall time):.*$", re.MULTILINE), r"\1: …"),            # %time
]


def _last_frame(line: str) -> str:
    "What a terminal shows of a line rewritten with carriage returns (progress bars)."
    parts = [p for p in line.split("\r") if p]
    return parts[-1] if parts else ""


def normalise(text: str) -> str:
    "`text` with carriage-return redraws collapsed and addresses, timings and local paths replaced by placeholders."
    if "\r" in text:
        text = "\n".join(_last_frame(line) for line in text.split("\n"))
    for path, sub in _PATHS:
        text = text.replace(path, sub)
    for pattern, sub in _SUBS:
        text = pattern.sub(sub, text)
    return text


def _norm_lines(value):
    "A notebook text field (str or list of lines) normalised, as a list of lines."
    text = value if isinstance(value, str) else "".join(value)
    return normalise(text).splitlines(True)


def normalise_outputs(outputs: list) -> list:
    "Cell outputs with their text normalised (stream text and every text/* mime type)."
    for out in outputs:
        if "text" in out:
            out["text"] = _norm_lines(out["text"])
        for mime in list(out.get("data", {})):
            if mime.startswith("text/"):
                out["data"][mime] = _norm_lines(out["data"][mime])
        if "execution_count" in out:
            out["execution_count"] = None
    return outputs


# ---------------------------------------------------------------- comparison

def comparable(outputs: list) -> list[str]:
    "What `check` compares of a cell's outputs: stdout text, text/* data, and where images are (not their bytes)."
    items: list[str] = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            if out.get("name") != "stdout":
                continue
            text = "".join(out["text"])
            if items and items[-1].startswith("[stdout]\n"):
                items[-1] += text  # a kernel may split one print stream in several outputs
            else:
                items.append("[stdout]\n" + text)
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            for mime in sorted(data):
                if mime.startswith("text/"):
                    items.append(f"[{kind} {mime}]\n" + "".join(data[mime]))
                elif mime.startswith("image/"):
                    items.append(f"[{kind} {mime}: an image; its bytes are not compared]")
        elif kind == "error":
            items.append(f"[error] {out.get('ename')}: {out.get('evalue')}")
    return [item if item.endswith("\n") else item + "\n" for item in items]


def _cell_label(nb_path: Path, index: int, cell) -> str:
    "How messages name a cell: its position counted from 1 among all cells, its id and its first line of code."
    first = next((line for line in "".join(cell["source"]).splitlines() if line and not line.startswith("#|")), "")
    return f"{_rel(nb_path)} cell {index + 1} (id {cell.get('id', '?')}): {first[:60]!r}"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def stale_cells(nb_path: Path, stored, fresh) -> list[str]:
    "One message per code cell whose compared outputs differ between the `stored` and the `fresh` notebook."
    messages = []
    for index, (old, new) in enumerate(zip(stored["cells"], fresh["cells"])):
        if old["cell_type"] != "code" or VOLATILE in directives(old):
            continue
        want, got = comparable(old.get("outputs", [])), comparable(new.get("outputs", []))
        if want != got:
            diff = difflib.unified_diff(want and "".join(want).splitlines(True) or ["(no output)\n"],
                                        got and "".join(got).splitlines(True) or ["(no output)\n"],
                                        "stored", "now", n=2)
            body = "".join("    " + line if line.endswith("\n") else "    " + line + "\n" for line in diff)
            messages.append(f"{_cell_label(nb_path, index, old)}: stored output differs from what the code prints now\n"
                            + body)
    return messages


# ---------------------------------------------------------------- execution (in a child process)

def directives(cell) -> dict[str, list[str]]:
    "The `#| ...` directives of a code cell, parsed by nbdev (`{'export': [], 'eval:': ['false']}`)."
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    return extract_directives(AttrDict(cell_type="code", source="".join(cell["source"])), remove=False) or {}


def skipped(cell, flags: set[str]) -> bool:
    "True for a cell `nbdev_test` does not run: markdown, flagged with a test flag, `eval: false`, `nbdev_export()`."
    if cell["cell_type"] != "code":
        return True
    if "nbdev_export" + "(" in "".join(cell["source"]):
        return True
    directives_ = directives(cell)
    if directives_.get("eval:", [""])[0].lower() == "false":
        return True
    return bool(flags & directives_.keys())


def _clean(nb, cfg) -> None:
    "Clean `nb` with nbdev_clean's own function and the settings `cfg`, so that `nbdev_clean` is a no-op on it."
    from nbdev.clean import clean_nb
    clean_nb(nb, False, cfg.get("allowed_metadata_keys").split(), cfg.get("allowed_cell_metadata_keys").split(),
             cfg.clean_ids)


def execute(nb_path: Path, force: set[str] = frozenset()):
    """Execute the notebook at `nb_path` like nbdev_test; the notebook with normalised outputs, or a message on an exception.

    Cells flagged with one of `force` run too (as `nbdev_test --flags`) but keep no output: flagged cells never have one."""
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    from nbdev.config import get_config

    os.environ["IN_TEST"] = "1"
    nb_path = nb_path.resolve()
    nb = read_nb(nb_path)
    cfg = get_config(path=ROOT)  # this repository's settings.ini, wherever the notebook is
    flags = set(cfg.tst_flags.split())
    os.chdir(nb_path.parent)
    shell = CaptureShell(nb_path)
    shell.run(PRELUDE)
    if shell.exc:
        return None, f"{_rel(nb_path)}: the seeding prelude failed: {shell.exc!r}"
    for index, cell in enumerate(nb.cells):
        if cell["cell_type"] != "code":
            continue
        cell["execution_count"] = None
        cell["outputs"] = []
        if skipped(cell, flags - force):
            continue
        shell.cell(cell)
        if shell.exc is not None:
            import traceback
            tb = "".join(traceback.format_exception(type(shell.exc), shell.exc, shell.exc.__traceback__))
            return None, f"{_cell_label(nb_path, index, cell)} raised {type(shell.exc).__name__}:\n{normalise(tb)}"
        if skipped(cell, flags):  # a forced flagged cell: it ran, but keeps no output
            cell["outputs"] = []
        else:
            normalise_outputs(cell["outputs"])
    _clean(nb, cfg)
    return nb, None


def _child(mode: str, nb_path: Path) -> int:
    "Execute one notebook; store it or check it. Exit status 0 ok, 3 stale outputs, 2 an exception in a cell."
    from execnb.nbio import read_nb, write_nb
    # Ctrl-C raises KeyboardInterrupt in the cells even when this runs as a shell's background job, which starts with
    # SIGINT ignored (the chapters demonstrate what mcsae does on Ctrl-C)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    nb_path = nb_path.resolve()
    fresh, error = execute(nb_path, set(os.environ.get("MCSAE_NB_FLAGS", "").split()))
    if error:
        print(error)
        return 2
    if mode == "store":
        write_nb(fresh, nb_path)  # writes only if something changed
        return 0
    stored = read_nb(nb_path)
    messages = stale_cells(nb_path, stored, fresh)
    if messages and not any(cell.get("outputs") for cell in stored["cells"]):
        print(f"{_rel(nb_path)} is stored without outputs (code cells that print or show something now: "
              f"{len(messages)}); execute it with `{REFRESH}` and commit it")
        return STALE
    for message in messages:
        print(message)
    return STALE if messages else 0


# ---------------------------------------------------------------- driver

def _run_one(mode: str, nb_path: Path, flags: str = "") -> tuple[Path, int, str, float]:
    env = {**os.environ, "MCSAE_NB_FLAGS": flags, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "_child", mode, str(nb_path)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    return nb_path, proc.returncode, proc.stdout, time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["store", "check", "_child"],
                        help="store: execute the notebooks and write their outputs into them; "
                             "check: execute them and fail if one raises or its stored outputs are stale")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: every nbs/*.ipynb); `_child` takes the mode and one notebook")
    parser.add_argument("--n_workers", type=int, default=2, help="notebooks executed at the same time (default 2)")
    parser.add_argument("--flags", default="", help="check only: space-separated test flags whose cells run anyway "
                                                    "(as nbdev_test --flags, e.g. 'slow'); their outputs are not stored")
    args = parser.parse_intermixed_args(argv)  # options may come before or after the notebooks
    if args.mode == "_child":
        return _child(str(args.notebooks[0]), args.notebooks[1])
    paths = args.notebooks or notebooks()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}; pass paths like nbs/01_sae.ipynb", file=sys.stderr)
        return 2
    if args.flags and args.mode == "store":
        print("--flags is for check only: flagged cells keep no stored output", file=sys.stderr)
        return 2
    if args.n_workers < 1:
        print(f"--n_workers must be at least 1, got {args.n_workers}", file=sys.stderr)
        return 2
    start = time.time()
    failed = []
    with ThreadPoolExecutor(args.n_workers) as pool:
        for path, status, output, seconds in pool.map(lambda p: _run_one(args.mode, p, args.flags), paths):
            verdict = {0: "ok", STALE: "STALE OUTPUTS", 2: "FAILED"}.get(status, f"FAILED (exit status {status})")
            print(f"{_rel(path)}: {verdict} ({seconds:.0f} s)", flush=True)
            if output.strip():
                print(output.rstrip() + "\n", flush=True)
            if status:
                failed.append((path, status))
    print(f"{len(paths)} notebooks in {time.time() - start:.0f} s")
    if failed:
        stale = [_rel(p) for p, s in failed if s == STALE]
        broken = [_rel(p) for p, s in failed if s != STALE]
        if broken:
            print(f"Failed (an exception, see above): {', '.join(broken)}", file=sys.stderr)
        if stale:
            print(f"Stored outputs out of date in: {', '.join(stale)}. If the new outputs are right, refresh them with "
                  f"`{REFRESH}` (or `python docs/notebooks.py store {' '.join(stale)}`) and commit.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

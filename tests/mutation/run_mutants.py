"""Run hand-written mutants of simtorch against the tests that should catch them; report the survivors.

Each mutant (``mutants.py``) replaces one exact piece of source text with a plausible bug: an off-by-one
in centring, a dropped term of unbiased HSIC, a cache key missing an option, a checksum never compared.
The runner copies the working tree (tracked and untracked, not ignored files; with ``--rev`` the files of
one commit instead) to a scratch folder once, applies each mutant there in turn, runs the mutant's tests
with ``pytest -x -q`` under a time limit, and restores the file before the next mutant. The working tree is
never written, so a crash, a timeout or Ctrl-C can never leave a mutant behind; the scratch folder is
removed at the end.

A mutant is *killed* when its tests fail (or time out), *survived* when they pass. A mutant whose text is
no longer found exactly once (the code changed) is reported as *stale* and not run. Before the mutants,
the union of their tests runs once unmutated (the baseline): a test that already fails would kill every
mutant, so a failing baseline stops the run.

Usage, from the repository root::

    .venv/bin/python tests/mutation/run_mutants.py                       # every mutant
    .venv/bin/python tests/mutation/run_mutants.py --folder measure/engine
    .venv/bin/python tests/mutation/run_mutants.py --only engine-cache-key-options --show-output
    .venv/bin/python tests/mutation/run_mutants.py --list
    .venv/bin/python tests/mutation/run_mutants.py --folder extract/store --tests tests/extract
    .venv/bin/python tests/mutation/run_mutants.py --rev HEAD            # the last commit, not the working tree

Exit status: 0 when every mutant run was killed, 1 when one survived (``--allow-survivors``: 0),
2 when the baseline fails or a mutant could not be run (a missing test path, stale text).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import FOLDERS, MUTANTS, Mutant  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tree_files(root: Path) -> list[str]:
    """The working tree's files as git sees them: tracked (as they are now) and untracked, not ignored."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "data", "__pycache__", ".pytest_cache", ".hypothesis"}
        return [str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and not skip.intersection(p.relative_to(root).parts)]
    return [name for name in out.decode().split("\0") if name]


def copy_tree(root: Path, dest: Path, rev: str | None = None) -> None:
    """The working tree (or, with ``rev``, the files of that commit) copied into ``dest``."""
    if rev is not None:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=root, capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"error: git archive {rev} failed: {archive.stderr.decode().strip()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
        return
    for name in tree_files(root):
        source = root / name
        if source.is_file() and "__pycache__" not in Path(name).parts:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_pytest(copy: Path, tests: Sequence[str], timeout: float, stop_first: bool = True) -> tuple[int | None, str]:
    """(pytest's exit status or None on timeout, its output) for ``tests`` run inside the copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant of the same size and second must never meet a stale .pyc
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *tests]
    proc = subprocess.Popen(argv, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started
        output, _ = proc.communicate()
        return None, output
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` line of pytest's short summary, shortened."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:150]
    return ""


def verdict(code: int | None) -> str:
    if code is None:
        return "killed (timeout)"
    return {0: "SURVIVED", 1: "killed", 2: "killed (error)"}.get(code, f"error (pytest exit {code})")


def select(args: argparse.Namespace) -> list[Mutant]:
    chosen = [m for m in MUTANTS
              if (not args.folder or m.folder in args.folder) and (not args.only or m.id in args.only)]
    unknown = set(args.only or ()) - {m.id for m in MUTANTS}
    if unknown:
        raise SystemExit(f"error: no mutant named {', '.join(sorted(unknown))}; see --list.")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", action="append", choices=FOLDERS, help="only the mutants of this source folder")
    parser.add_argument("--only", action="append", metavar="ID", help="only this mutant (repeatable)")
    parser.add_argument("--tests", nargs="+", metavar="PATH", help="run these tests for every mutant instead of "
                        "each mutant's own selection (for example a whole test folder)")
    parser.add_argument("--rev", metavar="COMMIT", help="mutate the files of this commit (for example HEAD) "
                        "instead of the working tree, so that unfinished edits elsewhere do not fail the baseline")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant (default 300)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--allow-survivors", action="store_true", help="exit 0 even when mutants survive")
    parser.add_argument("--show-output", action="store_true", help="print pytest's output for every mutant")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)

    mutants = select(args)
    if args.list:
        for m in mutants:
            print(f"{m.id:44s} {m.path}\n    {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    if not mutants:
        print("no mutant selected")
        return 2

    copy = Path(tempfile.mkdtemp(prefix="simtorch-mutants-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the scratch folder is removed
    results: list[dict] = []
    try:
        copy_tree(ROOT, copy, args.rev)
        print(f"scratch copy of {ROOT}{f' at {args.rev}' if args.rev else ''}: {copy}", flush=True)
        runnable = []
        for m in mutants:
            count = (copy / m.path).read_text(encoding="utf-8").count(m.find) if (copy / m.path).is_file() else 0
            if count != 1:
                status = "stale (text not found)" if count == 0 else f"stale (text found {count} times)"
                results.append({"id": m.id, "folder": m.folder, "status": status, "seconds": 0.0, "failure": ""})
            else:
                runnable.append(m)
        if not args.no_baseline and runnable:
            union = list(dict.fromkeys(args.tests or [t for m in runnable for t in m.tests]))
            start = time.monotonic()
            code, output = run_pytest(copy, union, args.timeout * 4, stop_first=False)
            print(f"baseline: {len(union)} test selections, pytest exit {code}, {time.monotonic() - start:.0f} s",
                  flush=True)
            if code != 0:
                print(output[-4000:])
                print("error: the tests fail without any mutant; fix them (or run with --no-baseline) first.")
                return 2
        header = f"{'mutant':44s} {'folder':18s} {'result':17s} {'s':>5s}"
        print(header + "\n" + "-" * len(header), flush=True)
        for r in results:
            print(f"{r['id']:44s} {r['folder']:18s} {r['status']:17s} {0:5.0f}", flush=True)
        for m in runnable:
            path = copy / m.path
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.find, m.replace, 1), encoding="utf-8")
            start = time.monotonic()
            try:
                code, output = run_pytest(copy, args.tests or m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            seconds = time.monotonic() - start
            status = verdict(code)
            results.append({"id": m.id, "folder": m.folder, "status": status, "seconds": round(seconds, 1),
                            "failure": first_failure(output)})
            print(f"{m.id:44s} {m.folder:18s} {status:17s} {seconds:5.0f}", flush=True)
            if args.show_output or status.startswith("error"):
                print(output[-3000:])
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return report(results, args)


def report(results: list[dict], args: argparse.Namespace) -> int:
    print()
    for folder in FOLDERS:
        ran = [r for r in results if r["folder"] == folder and r["status"].startswith(("killed", "SURVIVED"))]
        if ran:
            killed = sum(r["status"].startswith("killed") for r in ran)
            print(f"{folder:18s} {killed}/{len(ran)} killed ({100 * killed / len(ran):.0f} %)")
    ran = [r for r in results if r["status"].startswith(("killed", "SURVIVED"))]
    killed = sum(r["status"].startswith("killed") for r in ran)
    if ran:
        print(f"{'all':18s} {killed}/{len(ran)} killed ({100 * killed / len(ran):.0f} %)")
    survivors = [r for r in results if r["status"] == "SURVIVED"]
    by_id = {m.id: m for m in MUTANTS}
    for r in survivors:
        print(f"survived: {r['id']} ({by_id[r['id']].path}): {by_id[r['id']].why}")
    problems = [r for r in results if not r["status"].startswith(("killed", "SURVIVED"))]
    for r in problems:
        print(f"not run: {r['id']}: {r['status']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if problems:
        return 2
    return 1 if survivors and not args.allow_survivors else 0


if __name__ == "__main__":
    sys.exit(main())

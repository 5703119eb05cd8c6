"""Coverage-guided fuzzing of the frame reader and `classify` with atheris.

    python -m tests.fuzz --minutes 10                 # both targets, 10 minutes each
    python -m tests.fuzz --target frames --seconds 3  # what the suite runs

Starts from the checked-in seed corpus (tests/fuzz/corpus/TARGET) and keeps what it
finds in a scratch corpus (`--work DIR`, default a temporary directory), so the
checked-in seeds only change by hand. A failing input is written as crash-* in the
current directory and the run exits non-zero.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SEEDS = Path(__file__).parent / "corpus"
TARGETS = ("frames", "classify")


def run_target(target: str, seconds: int, work: Path) -> int:
    """One target in a child process of its own: libFuzzer owns the process it runs in."""
    corpus = work / target
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in (SEEDS / target).iterdir():
        shutil.copy(seed, corpus / seed.name)
    return subprocess.call([sys.executable, "-m", "tests.fuzz", "--child", target,
                            f"-max_total_time={seconds}", "-max_len=8192", "-timeout=10",
                            "-rss_limit_mb=1024", "-print_final_stats=1", str(corpus)])


def child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris
    with atheris.instrument_imports(include=["bridge", "tests.fuzz"]):
        from tests.fuzz import harness
    function = {"frames": harness.frames_target, "classify": harness.classify_target}[target]
    atheris.Setup([sys.argv[0], *libfuzzer_args], function)
    atheris.Fuzz()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", allow_abbrev=False,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=TARGETS, action="append")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--work", type=Path, help="scratch corpus directory")
    args = parser.parse_args()
    seconds = max(1, int(args.seconds if args.seconds else (args.minutes or 1) * 60))
    work = args.work or Path(tempfile.mkdtemp(prefix="tutum-bridge-fuzz-"))
    worst = 0
    for target in args.target or TARGETS:
        worst = max(worst, run_target(target, seconds, work))
    return worst


if __name__ == "__main__":
    sys.exit(main())

"""METEOR 1.5 through pycocoevalcap's jar (Java), with the same protocol as coco-caption.

METEOR's paraphrase tables and stemmer live in the jar, so there is no Python re-implementation:
this module starts ``java -jar meteor-1.5.jar - - -stdio -l en -norm``, sends one ``SCORE`` line
per image and one ``EVAL`` line, and reads the per-image and overall scores back.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MeteorUnavailable", "meteor", "meteor_jar"]


class MeteorUnavailable(RuntimeError):
    """Java or the METEOR jar is missing."""


def meteor_jar() -> Path:
    """Path of pycocoevalcap's ``meteor-1.5.jar``; raises :class:`MeteorUnavailable` if absent."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MeteorUnavailable(
            "METEOR needs pycocoevalcap's meteor-1.5.jar: `pip install pycocoevalcap` "
            "(or leave METEOR out: metrics=('bleu', 'rouge', 'cider'))"
        )
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    if not jar.exists():
        raise MeteorUnavailable(f"METEOR jar not found at {jar}; reinstall pycocoevalcap")
    return jar


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable(
            "METEOR needs Java, but `java` is not on PATH: install a JRE (e.g. `apt-get install "
            "default-jre-headless`) or leave METEOR out: metrics=('bleu', 'rouge', 'cider')"
        )
    return java


def _readline(proc: subprocess.Popen, stderr) -> str:
    line = proc.stdout.readline()
    if not line:
        stderr.seek(0)
        detail = stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"METEOR (Java) stopped early (exit code {proc.poll()}): {detail}")
    return line.decode().strip()


def meteor(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """Overall METEOR and per-image scores for tokenised ``res[k]`` against ``gts[k]``."""
    jar = meteor_jar()
    cmd = [_java(), "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
        try:
            stats = []
            for key in gts:
                hyp = res[key].replace("|||", "").replace("  ", " ")
                proc.stdin.write(f"SCORE ||| {' ||| '.join(gts[key])} ||| {hyp}\n".encode())
                proc.stdin.flush()
                stats.append(_readline(proc, stderr))
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
            proc.stdin.flush()
            scores = np.array([float(_readline(proc, stderr)) for _ in stats])
            return float(_readline(proc, stderr)), scores
        finally:
            proc.stdin.close()
            proc.kill()
            proc.wait()

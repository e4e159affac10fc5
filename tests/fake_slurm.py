"""A stand-in for Slurm's sbatch, srun, sacct and scancel on one machine, for tests of the Slurm executor.

``install(folder)`` writes the four commands to ``folder/bin`` and returns the environment that puts them
first on PATH. ``sbatch`` runs the script in the background as a job (the ``SLURM_*`` variables a job sees)
and prints ``Submitted batch job N``; ``srun`` runs its command with ``--output``/``--error`` (``%j``, ``%t``
expanded); ``sacct`` reports RUNNING, COMPLETED or FAILED from the state files; ``scancel`` kills the job.
Jobs outlive the process that submitted them, as on a cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SBATCH = r'''
import os, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"]); state.mkdir(parents=True, exist_ok=True)
counter = state / "next"
jid = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(jid + 1))
(state / f"{jid}.state").write_text("RUNNING")
env = {**os.environ, "SLURM_JOB_ID": str(jid), "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
       "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
done = f'if [ $? -eq 0 ]; then echo COMPLETED > {state}/{jid}.state; else echo FAILED > {state}/{jid}.state; fi'
p = subprocess.Popen(["bash", "-c", f"bash {sys.argv[-1]}; {done}"], env=env, start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
(state / f"{jid}.pid").write_text(str(p.pid))
with open(state / "submitted.log", "a") as fh:
    fh.write(f"{jid}\n")
print(f"Submitted batch job {jid}")
'''
SRUN = r'''
import os, sys
args, files = sys.argv[1:], {}
while args and args[0].startswith("--"):
    if args[0] in ("--output", "--error"):
        files[args[0]] = args[1].replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
        args = args[2:]
    else:
        args = args[1:]
for flag, fd in (("--output", 1), ("--error", 2)):
    if flag in files:
        os.makedirs(os.path.dirname(files[flag]), exist_ok=True)
        os.dup2(os.open(files[flag], os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
os.execvp(args[0], args)
'''
SACCT = r'''
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for jid in ids:
    f = state / f"{jid}.state"
    if f.exists():
        print(f"{jid}|{f.read_text().strip()}|localhost")
'''
SCANCEL = r'''
import os, signal, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
jid = [a for a in sys.argv[1:] if a.isdigit()][0]
try:
    os.killpg(int((state / f"{jid}.pid").read_text()), signal.SIGKILL)
except (OSError, ValueError):
    pass
(state / f"{jid}.state").write_text("CANCELLED")
'''


def install(folder: Path) -> dict[str, str]:
    """Write the fake commands to ``folder/bin``; the environment to run sertk under them."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, code in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("scancel", SCANCEL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_SLURM_DIR": str(folder / "state")}


def submitted(env: dict[str, str]) -> list[str]:
    """The job ids sbatch gave out, in order."""
    log = Path(env["FAKE_SLURM_DIR"]) / "submitted.log"
    return log.read_text().split() if log.exists() else []

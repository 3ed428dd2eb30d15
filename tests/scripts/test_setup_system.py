"""scripts/setup_system.sh on a machine without Slurm: installs with apt as root, else one clear failure."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/setup_system.sh"
PACKAGES = "slurmctld slurmd slurm-client munge espeak-ng sox"


def _bare_path(tmp_path) -> Path:
    """A PATH holding only bash (the script uses builtins otherwise): no Slurm, no apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to("/bin/bash")
    return bin_dir


def _run(bin_dir, **env):
    return subprocess.run(["/bin/bash", str(SCRIPT)], env={"PATH": str(bin_dir), **env},
                          capture_output=True, text=True, timeout=60)


def test_without_root_names_the_packages_and_the_tests_and_fails(tmp_path):
    run = _run(_bare_path(tmp_path), SETUP_SYSTEM_UID="1000")
    assert run.returncode == 1
    assert f"missing system packages: {PACKAGES} (installing them needs root)" in run.stderr
    assert "tests/slurm/test_pretrain_launcher.py" in run.stderr


def test_as_root_without_apt_fails_with_the_reason(tmp_path):
    run = _run(_bare_path(tmp_path), SETUP_SYSTEM_UID="0")
    assert run.returncode == 1
    assert "(there is no apt-get on this machine)" in run.stderr


def test_as_root_with_apt_installs_the_missing_packages(tmp_path):
    """A stand-in apt-get records its calls and 'installs' by placing each package's command on PATH."""
    bin_dir = _bare_path(tmp_path)
    log = tmp_path / "apt.log"
    commands = {"slurmctld": "slurmctld", "slurmd": "slurmd", "slurm-client": "sinfo", "munge": "munged",
                "espeak-ng": "espeak-ng", "sox": "sox"}
    for name in ("cat", "chmod", "printf"):
        (bin_dir / name).symlink_to(f"/bin/{name}" if os.path.exists(f"/bin/{name}") else f"/usr/bin/{name}")
    cases = "\n".join(f"    {pkg}) printf '#!/bin/bash\\n' > {bin_dir}/{cmd}; chmod +x {bin_dir}/{cmd};;"
                      for pkg, cmd in commands.items() if pkg != "munge")  # munge is "already installed"
    (bin_dir / "munged").write_text("#!/bin/bash\n")
    (bin_dir / "munged").chmod(0o755)
    (bin_dir / "apt-get").write_text(f"""#!/bin/bash
echo "$DEBIAN_FRONTEND $*" >> {log}
for arg in "$@"; do
  case "$arg" in
{cases}
  esac
done
""")
    (bin_dir / "apt-get").chmod(0o755)
    run = _run(bin_dir, SETUP_SYSTEM_UID="0")
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == " update -qq"
    assert calls[1] == "noninteractive install -y -qq --no-install-recommends " + PACKAGES.replace(" munge", "")
    assert _run(bin_dir, SETUP_SYSTEM_UID="1000").returncode == 0  # nothing missing now: nothing to do

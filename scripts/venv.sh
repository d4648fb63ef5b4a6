# Sourced by scripts/test and scripts/balloon-hint: makes (or reuses) the project's virtualenv and
# installs the project into it. Sets $venv. BALLOON_HINT_VENV chooses another place.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BALLOON_HINT_VENV:-$here/.venv}
extras=${1:-}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.balloon-hint-installed$extras"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$here$extras"
    touch "$stamp"
fi

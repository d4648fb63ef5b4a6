# Sourced by scripts/test and scripts/balloon-hint: makes (or reuses) the project's virtualenv and
# installs the project into it. Sets $venv. BALLOON_HINT_VENV chooses another place.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BALLOON_HINT_VENV:-$here/.venv}
extras=${1:-}
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 needs the python3-venv package (ensurepip) for venvs.
        rm -rf "$venv"
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            echo "venv: installing Debian's python3-venv" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            python3 -m venv "$venv"
        else
            echo "venv: python3 -m venv failed; install python3-venv (Debian) and retry" >&2
            exit 1
        fi
    fi
fi
stamp="$venv/.balloon-hint-installed$extras"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$here$extras"
    touch "$stamp"
fi

#!/usr/bin/env bash
# The project's set-up, shared by the README's commands (`make run`, `make
# test` call it through `make setup`) and by docker/Dockerfile, so a change
# that breaks one breaks CI: a project-local venv with the PyPI torch wheel
# whose libtorch `tch` links against (models/requirements.txt), and the
# Debian packages the build needs where they are missing. Quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
REQUIREMENTS=models/requirements.txt
stamp="$VENV/.installed-$(sha256sum "$REQUIREMENTS" | cut -c1-16)"
[ -e "$stamp" ] && exit 0

missing=()
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3 python3-venv)
command -v c++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
# The TLS test makes its certificates with the openssl command (tests/api/support/pg_tls.rs).
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "setup: $VENV has $(grep '^torch==' "$REQUIREMENTS")"

#!/usr/bin/env bash
# Creates .venv-beam (git-ignored), a virtualenv on top of the main environment
# (--system-site-packages) holding Apache Beam (requirements-beam.txt) and the
# protobuf/pillow/pyarrow versions it pins. The main environment is not touched:
# Beam caps protobuf < 7, which would break `import seqio` there (see
# requirements-beam.txt). Idempotent: an existing venv whose Beam imports at the
# pinned version is left as it is.
#
#   scripts/install_beam.sh            # then:
#   python3 scripts/prepare_data.py --beam ...   (runs .venv-beam/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SLD_BEAM_VENV:-.venv-beam}
# One installer at a time (parallel test workers may all ask for the venv).
exec 9>"$VENV.lock"
flock 9
PIN=$(sed -n 's/^apache-beam\(\[[a-z,]*\]\)\{0,1\}==\([^ ]*\).*/\2/p' requirements-beam.txt)
# crcmod: the [tfrecord] extra (WriteToTFRecord's checksums).
if [[ -x "$VENV/bin/python" ]] && \
   "$VENV/bin/python" -c "import apache_beam, crcmod, sys; sys.exit(apache_beam.__version__ != '$PIN')" \
     2>/dev/null; then
  echo "[install_beam] $VENV already has apache-beam $PIN"
  exit 0
fi
echo "[install_beam] creating $VENV (python3 -m venv --system-site-packages)"
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-beam.txt
"$VENV/bin/python" -c "import apache_beam; print('[install_beam] apache-beam', apache_beam.__version__, 'in $VENV')"

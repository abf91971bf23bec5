# Source from the repository root on the lent GPU machine (see docs/perf/cuda-h200.md): makes
# arle's packages and its two commands usable without pip installing the project (the image
# has torch, triton and transformers but no network; starlette, uvicorn and prometheus-client
# travel as wheels under .whl/, fetched as the device tool's README says).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/arle-pkgs /tmp/arle-bin
for pair in arlec:arlec arle_targets:targets arle_runtime:runtime arle_models:models arle_templates:templates; do
  ln -sfn "$PWD/${pair#*:}" "/tmp/arle-pkgs/${pair%%:*}"
done
for pair in arlec:arlec.cli arle-runtime:arle_runtime.cli; do
  # The __main__ guard matters: `serve` spawns its engine process, which re-runs this script as __mp_main__.
  printf '#!/usr/bin/env python3\nimport sys\nfrom %s import main\nif __name__ == "__main__":\n    sys.exit(main())\n' "${pair#*:}" > "/tmp/arle-bin/${pair%%:*}"
  chmod +x "/tmp/arle-bin/${pair%%:*}"
done
export PYTHONPATH="/tmp/arle-pkgs:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/arle-bin:$PATH"

#!/usr/bin/env bash
# Prepare benchmarks/gpu.py for a GPU machine that has torch, transformers, peft and lightning but not lmas's
# other dependencies (the lent H200 machine: /work/.library/device/README.md). Run here, from the repo root:
#   bash benchmarks/gpu_prepare.sh
# It writes two git-ignored folders (listed in .git/info/exclude), to carry to that machine:
#   .whl/        wheels of hydra-core, omegaconf, antlr4-python3-runtime, defusedxml (the versions of the lock)
#   .gpu_model/  SmolLM2-135M's config and tokenizer files (3.4 MB; the weights stay here: the benchmark uses
#                random weights of the same architecture)
# and prints the command to run there (carry: [".whl", ".gpu_model"]).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.gpu_model/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
rm -rf .whl .gpu_model && mkdir -p .whl .gpu_model
pins=$(grep -E '^(hydra-core|omegaconf|antlr4-python3-runtime|defusedxml)==' requirements/lock.txt)
# antlr4-python3-runtime 4.9.3 is an sdist only: a pure-Python package, built into a wheel here
python3 -m pip wheel --no-deps -q -w .whl $pins
src=$(.venv/bin/python -c "from lmas.models.providers import ensure_smollm2_folder; print(ensure_smollm2_folder())")
for f in config.json tokenizer.json tokenizer_config.json generation_config.json chat_template.jinja; do
  [ -f "$src/$f" ] && cp "$src/$f" .gpu_model/
done
ls .whl .gpu_model
cat <<'CMD'
device command (carry [".whl", ".gpu_model"], timeout_s 420):
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/gpu.py --model-folder .gpu_model --out-dir $OUT 2>&1 | tee $OUT/gpu.log
CMD

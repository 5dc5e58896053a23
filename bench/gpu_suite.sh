#!/usr/bin/env bash
# Run on a lent CUDA machine from the repository root, with the wheels of hydra-core 1.3.2,
# omegaconf 2.3.0 and antlr4-python3-runtime 4.9.3 in .whl/ (see docs/performance.md).
# The test suite on the lent CUDA machine: wheels in, package installed, pytest in parallel.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 4; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/env.txt
python3 -c "import torch, torchvision, hydra, omegaconf; print(torch.__version__, torchvision.__version__, hydra.__version__, torch.cuda.is_available())" | tee -a $OUT/env.txt
python3 -m pip list 2>/dev/null | grep -iE "optuna|mlflow|tensorboard|submitit|joblib|onnx|timm|pytest" | tee -a $OUT/env.txt
which distill-cli | tee -a $OUT/env.txt
/usr/bin/time -v true >/dev/null 2>&1
start=$(date +%s)
timeout -s INT ${SUITE_S:-400} python3 -m pytest -n 16 --timeout=${TEST_TIMEOUT:-60} -v --tb=short -rfEs -p no:cacheprovider \
  --durations=40 --junitxml=$OUT/junit.xml ${PYTEST_ARGS:-} > $OUT/pytest.log 2>&1
echo "pytest rc=$? wall=$(( $(date +%s) - start ))s" | tee -a $OUT/env.txt
grep -E 'FAILED|ERROR' $OUT/pytest.log | tail -80; tail -40 $OUT/pytest.log

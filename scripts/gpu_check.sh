#!/usr/bin/env bash
# One GPU check of the whole stack, writing every result under OUT_DIR:
#   gpu-marked tests (kernels vs fp64 oracles at realistic shapes, model with vs without kernels),
#   the kernel benchmark (Polar vs SDPA flash/cuDNN, same run), the training benchmark (Polar vs
#   NoPE, ZeRO-3), and a 64K-token evaluation of a randomly initialised atma-378m.
# Usage: bash scripts/gpu_check.sh OUT_DIR [--quick]
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--quick]}
quick=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
# DeepSpeed's JIT op builder rejects arch suffixes such as 9.0a.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1

status=0
python -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1
seq_lens="2048 8192 32768"
[ "$quick" = "--quick" ] && seq_lens="2048 8192"
python -m kernels.bench --seq-lens $seq_lens --json "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.log" || status=1
python -m pretrain.bench --steps 10 --warmup 3 --json "$out/bench_training.json" 2>&1 | tee "$out/bench_training.log" || status=1

# 64K evaluation of the paper-size model (random init): peak memory and seconds per cell.
python - "$out" <<'PY' 2>&1 | tee "$out/eval_64k.log" || status=1
import os, sys, tokenizers
from tokenizers import models, pre_tokenizers, decoders, trainers
from model import AtmaConfig, AtmaForCausalLM
out = sys.argv[1]
mdir = os.path.join(out, "model-378m")
tok = tokenizers.Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
text = [open(os.path.join(d, f), encoding="utf-8", errors="ignore").read()
        for d in [os.path.dirname(os.__file__)] for f in sorted(os.listdir(d)) if f.endswith(".py")][:200]
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
model = AtmaForCausalLM(AtmaConfig.from_preset("atma-378m", vocab_size=4096))
model.save_pretrained(mdir)
tok.save(os.path.join(mdir, "tokenizer.json"))
from evaluation.long_context import run_evaluation
run_evaluation(mdir, "2k,8k,32k,64k", os.path.join(out, "eval_64k"), tasks=["passkey"], haystacks=["synthetic"],
               depths=(0.5,), trials=1, progress=False)
PY
rm -rf "$out/model-378m"
echo "gpu check finished with status $status" | tee -a "$out/gpu.txt"
exit $status

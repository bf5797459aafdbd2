#!/bin/sh
# Build the lab stand-in librkllmrt.so for every lab version and architecture, reproducibly:
# fixed flags, source paths mapped away, no build-id, stripped. Output:
#   lab/runtime/dist/<version>/<arch>/librkllmrt.so
# Usage: build.sh [OUTDIR]   (default: dist beside this script)
# Environment: VERSIONS (default "1.2.2 1.2.3"), ARCHES (default "x86_64 aarch64").
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/dist"}
versions=${VERSIONS:-"1.2.2 1.2.3"}
arches=${ARCHES:-"x86_64 aarch64"}

export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH=0

cflags="-std=c11 -O2 -fPIC -fvisibility=hidden -fno-ident -fno-asynchronous-unwind-tables -g0 -Wall -Wextra -Werror"
ldflags="-shared -nostartfiles -Wl,--build-id=none -Wl,--hash-style=gnu -Wl,-z,relro -Wl,-z,now -Wl,-z,noexecstack -Wl,-z,max-page-size=4096 -Wl,-z,common-page-size=4096 -s"

for arch in $arches; do
    case $arch in
        x86_64) cc=${CC_X86_64:-x86_64-linux-gnu-gcc}; command -v "$cc" >/dev/null 2>&1 || cc=gcc ;;
        aarch64) cc=${CC_AARCH64:-aarch64-linux-gnu-gcc} ;;
        *) echo "build.sh: unknown architecture $arch" >&2; exit 2 ;;
    esac
    if ! command -v "$cc" >/dev/null 2>&1; then
        echo "build.sh: $cc not found (needed for $arch)" >&2
        exit 3
    fi
    for version in $versions; do
        dir="$out/$version/$arch"
        mkdir -p "$dir"
        tmp="$dir/.librkllmrt.so.tmp"
        # shellcheck disable=SC2086
        (cd "$here" && "$cc" $cflags -ffile-prefix-map="$here"=. -DRKLLM_VERSION="\"$version\"" $ldflags \
            -o "$tmp" rkllmrt.c)
        mv -f "$tmp" "$dir/librkllmrt.so"
        echo "$dir/librkllmrt.so"
    done
done

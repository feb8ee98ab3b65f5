#!/usr/bin/env bash
# make_relion_refs.sh - regenerate the RELION reference files in tests/data/
#
# Euler-angle and CTF reference numbers computed by RELION's own programs (not by
# omlrelion), so that tests can check our rotation matrices and CTF model against
# RELION 3.1. See tests/data/README.md for what each file holds and how to read it.
#
# Usage:  tests/data/make_relion_refs.sh            (RELION programs on the PATH)
#         PYTHON=/path/to/python tests/data/make_relion_refs.sh
# Needs:  relion_project, relion_ctf_toolbox (RELION 3.1.x; made with Debian's
#         relion 3.1.3-3+b1, CPU, double precision), python3 with numpy and mrcfile.
# Works in a temporary folder; only the files listed in README.md are written here.
# Deterministic: no random numbers anywhere.
set -euo pipefail

OUT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
for p in relion_project relion_ctf_toolbox; do
    command -v "$p" >/dev/null || { echo "error: $p not on the PATH" >&2; exit 1; }
done
"$PYTHON" -c "import numpy, mrcfile" || { echo "error: $PYTHON needs numpy and mrcfile" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"

# ----------------------------------------------------------------------------------
# 1. Euler angles: projections of single bright voxels
# ----------------------------------------------------------------------------------
# 32^3 volumes of zeros, 1.0 in one voxel at (x,y,z) = centre + offset, centre index 16
# (= N//2, RELION's rotation centre); NumPy index order is [z, y, x].
#   spot1: (+6, 0, 0)   spot2: (0, +4, 0)   spot3: (0, 0, +3)   all: the three together
"$PYTHON" - <<'EOF'
import numpy as np, mrcfile
N, c = 32, 16
spots = {"spot1": (6, 0, 0), "spot2": (0, 4, 0), "spot3": (0, 0, 3)}
vol_all = np.zeros((N, N, N), np.float32)
for name, (x, y, z) in spots.items():
    v = np.zeros((N, N, N), np.float32)
    v[c + z, c + y, c + x] = 1.0
    vol_all += v
    with mrcfile.new(f"{name}.mrc") as m:
        m.set_data(v); m.voxel_size = 1.0
with mrcfile.new("all.mrc") as m:
    m.set_data(vol_all); m.voxel_size = 1.0
EOF

# RELION 3.1 STAR with one optics group; relion_project needs rlnImageName to exist
# (its value is not read: outputs are named after --o). No CTF columns are used.
cat > euler_angles.star <<'EOF'

# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnImageDimensionality #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
1 opticsGroup1 1.0 32 2 300.0 2.7 0.1

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOpticsGroup #5
1@input.mrcs     0.0    0.0    0.0 1
2@input.mrcs    40.0    0.0    0.0 1
3@input.mrcs     0.0   50.0    0.0 1
4@input.mrcs     0.0    0.0  -65.0 1
5@input.mrcs    25.0   60.0  -70.0 1
6@input.mrcs  -120.0  135.0  160.0 1
7@input.mrcs    75.0  100.0   20.0 1
EOF
for v in spot1 spot2 spot3 all; do
    relion_project --i "$v.mrc" --o "euler_proj_$v" --ang euler_angles.star --angpix 1.0 > "project_$v.log" 2>&1 \
        || { cat "project_$v.log" >&2; exit 1; }
done

# ----------------------------------------------------------------------------------
# 2. CTF: four parameter sets, two RELION programs
# ----------------------------------------------------------------------------------
# set  box angpix  kV   Cs   Q0    defU   defV   defAngle phase  B-factor
cat > ctf_sets.txt <<'EOF'
1 64 1.0 300 2.7 0.10 15000 13000  30  0   0
2 64 2.5 200 2.0 0.07 25000 22000 -40  0 200
3 64 1.0 300 2.7 0.10  6000  5400 120 90  50
4 64 2.5 300 2.7 0.07 30000 29000  75 45 400
EOF
# a centred delta (1.0 at index 32 of a 64^3 box): its projection is flat in Fourier space
"$PYTHON" -c "
import numpy as np, mrcfile
v = np.zeros((64, 64, 64), np.float32); v[32, 32, 32] = 1.0
with mrcfile.new('delta.mrc') as m: m.set_data(v)
"
echo "set,box,angpix,voltage_kV,cs_mm,amplitude_contrast,defocus_u_A,defocus_v_A,defocus_angle_deg,phase_shift_deg,bfactor_A2,toolbox_file,project_file" > ctf_sets.csv
while read -r set box apix kv cs q0 du dv ang ps bf; do
    # (a) relion_ctf_toolbox --simulate: writes the CTF itself (no B-factor option)
    relion_ctf_toolbox --simulate "ctf_toolbox_set$set.mrc" --box "$box" --angpix "$apix" --kV "$kv" \
        --Cs "$cs" --Q0 "$q0" --defU "$du" --defV "$dv" --defAng "$ang" --phase_shift "$ps" < /dev/null \
        > "toolbox_$set.log" 2>&1 || { cat "toolbox_$set.log" >&2; exit 1; }
    # (b) relion_project --ctf of the delta, CTF (with B-factor) from a particle STAR
    cat > "ctf_set$set.star" <<EOF

# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnImageDimensionality #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
1 opticsGroup1 $apix $box 2 $kv $cs $q0

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnDefocusU #5
_rlnDefocusV #6
_rlnDefocusAngle #7
_rlnPhaseShift #8
_rlnCtfBfactor #9
_rlnOpticsGroup #10
1@input.mrcs 0.0 0.0 0.0 $du $dv $ang $ps $bf 1
EOF
    relion_project --i delta.mrc --o "ctf_project_set$set" --ang "ctf_set$set.star" --angpix "$apix" --ctf < /dev/null \
        > "project_ctf_$set.log" 2>&1 || { cat "project_ctf_$set.log" >&2; exit 1; }
    echo "$set,$box,$apix,$kv,$cs,$q0,$du,$dv,$ang,$ps,$bf,ctf_toolbox_set$set.mrc,ctf_project_set$set.mrcs" >> ctf_sets.csv
done < ctf_sets.txt

# ----------------------------------------------------------------------------------
# provenance and copy-out
# ----------------------------------------------------------------------------------
{
    echo "made by tests/data/make_relion_refs.sh"
    relion_project --version 2>&1 | grep -v '^\s*$'
    if command -v dpkg-query >/dev/null && dpkg-query -W relion >/dev/null 2>&1; then
        echo "package: $(dpkg-query -W -f='${Package} ${Version} ${Architecture}' relion)"
    fi
} > relion_refs_version.txt
cp euler_angles.star euler_proj_spot1.mrcs euler_proj_spot2.mrcs euler_proj_spot3.mrcs \
   euler_proj_all.mrcs euler_proj_all.star \
   ctf_sets.csv ctf_set[1-4].star ctf_toolbox_set[1-4].mrc ctf_project_set[1-4].mrcs \
   relion_refs_version.txt "$OUT/"
ls -l "$OUT"/euler_* "$OUT"/ctf_* "$OUT"/relion_refs_version.txt

"""The same input and seed give byte-identical outputs on the CPU (simulate -> reconstruct)."""

from omlrelion.cli.main import run


def test_simulate_and_reconstruct_are_byte_identical(tmp_path):
    maps = []
    for attempt in ("a", "b"):
        folder = tmp_path / attempt
        folder.mkdir()
        assert run(["simulate", "--map", "phantom", "--box", "32", "--angpix", "3", "--n", "300", "--snr", "0.5",
                    "--shift_max", "2", "--seed", "7", "--o", str(folder / "particles"), "--quiet"]) == 0
        for devices in ("cpu", "cpu:2"):
            out = folder / f"map_{devices.replace(':', '')}.mrc"
            assert run(["reconstruct", "--i", str(folder / "particles.star"), "--o", str(out), "--ctf",
                        "--device", devices, "--quiet"]) == 0
        maps.append(folder)
    a, b = maps
    for name in ("particles.mrcs", "particles.star", "map_cpu.mrc", "map_cpu2.mrc"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

"""omlrelion: GPU cryo-EM 3D reconstruction and refinement, RELION-compatible."""

__version__ = "0.1.0"

"""3D refinement: sampling of the hidden variables and the expectation step (`relion-refinement.md`)."""

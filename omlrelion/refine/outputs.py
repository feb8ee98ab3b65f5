"""Files of a refinement named and laid out as RELION's auto-refine writes them."""

from __future__ import annotations

import numpy as np

from omlrelion.io.star import write_star


def write_model_star(path, model: dict, tau2, sigma2, ssnr, *, fudge: float, reference: str, curve=None,
                     sigma2_noise=None, pdf_direction=None) -> None:
    """RELION's *_model.star: model_general, model_classes, the per-shell model_class_1 table and,
    with `sigma2_noise` (per shell), the model_optics_group_1 noise spectrum; with `pdf_direction`
    (per direction of the iteration's HEALPix grid), model_pdf_orient_class_1.

    model: box_size, angpix, pad, r_max, current_resolution_A, resolution_0143_A and fsc (per shell);
    optional ave_pmax, acc_rot_deg and acc_trans_A (RELION's accuracy estimates).
    """
    import pandas as pd

    box, angpix = model["box_size"], model["angpix"]
    shells = np.arange(box // 2 + 1)
    pad = lambda a: np.pad(np.asarray(a, float), (0, max(0, len(shells) - len(a))))[:len(shells)]  # noqa: E731
    general = pd.DataFrame({"rlnReferenceDimensionality": [3], "rlnDataDimensionality": [2],
                            "rlnOriginalImageSize": [box], "rlnCurrentResolution": [model["current_resolution_A"]],
                            "rlnCurrentImageSize": [2 * model["r_max"]], "rlnPaddingFactor": [model["pad"]],
                            "rlnPixelSize": [angpix], "rlnNrClasses": [1], "rlnTau2FudgeFactor": [fudge]})
    if "ave_pmax" in model:
        general["rlnAveragePmax"] = [model["ave_pmax"]]
    classes = pd.DataFrame({"rlnReferenceImage": [reference], "rlnClassDistribution": [1.0],
                            "rlnEstimatedResolution": [model["resolution_0143_A"]]})
    if model.get("acc_rot_deg") is not None:
        classes["rlnAccuracyRotations"] = [model["acc_rot_deg"]]
        classes["rlnAccuracyTranslationsAngst"] = [model["acc_trans_A"]]
    with np.errstate(divide="ignore"):
        table = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": shells / (box * angpix),
                              "rlnAngstromResolution": np.where(shells > 0, box * angpix / np.maximum(shells, 1), 999.0),
                              "rlnSsnrMap": pad(ssnr), "rlnGoldStandardFsc": pad(model["fsc"] if curve is None else curve),
                              "rlnReferenceSigma2": pad(sigma2), "rlnReferenceTau2": pad(tau2)})
    blocks = {"model_general": general, "model_classes": classes, "model_class_1": table}
    if sigma2_noise is not None:
        blocks["model_optics_group_1"] = pd.DataFrame({"rlnSpectralIndex": shells,
                                                       "rlnResolution": shells / (box * angpix),
                                                       "rlnSigma2Noise": pad(sigma2_noise)})
    if pdf_direction is not None:
        blocks["model_pdf_orient_class_1"] = pd.DataFrame(
            {"rlnOrientationDistribution": np.asarray(pdf_direction, dtype=np.float64)})
    write_star(path, blocks)


def write_sampling_star(path, sampling, *, angpix: float, perturb_factor: float, original) -> None:
    """RELION's *_sampling.star: data_sampling_general (HEALPix order, psi step, offsets in A, the
    perturbation, the point group and the starting values) and the kept (rot, tilt) directions.

    sampling: the iteration's `refine.sampling.Sampling` (order, offsets in px, perturbation, point
    group); original: the starting `Sampling` of the run.
    """
    import pandas as pd

    from omlrelion.refine.sampling import angular_step

    general = pd.DataFrame({
        "rlnIs3DSampling": [1], "rlnIs3DTranslationalSampling": [0], "rlnHealpixOrder": [sampling.order],
        "rlnSymmetryGroup": [sampling.symmetry], "rlnTiltAngleLimit": [-91.0], "rlnPsiStep": [angular_step(sampling.order)],
        "rlnOffsetRange": [sampling.offset_range_px * angpix], "rlnOffsetStep": [sampling.offset_step_px * angpix],
        "rlnHelicalOffsetStep": [-1.0], "rlnSamplingPerturbInstance": [sampling.perturb],
        "rlnSamplingPerturbFactor": [perturb_factor], "rlnHealpixOrderOriginal": [original.order],
        "rlnPsiStepOriginal": [angular_step(original.order)],
        "rlnOffsetRangeOriginal": [original.offset_range_px * angpix],
        "rlnOffsetStepOriginal": [original.offset_step_px * angpix]})
    directions = pd.DataFrame({"rlnAngleRot": sampling.directions[:, 0], "rlnAngleTilt": sampling.directions[:, 1]})
    write_star(path, {"sampling_general": general, "sampling_directions": directions})

"""Published calibrations for step caching on Wan models (numbers only; the rules are `step_cache.py`).

These are facts recorded from their publications, each with its source. None was fitted by this
pack, and they were calibrated on the real models (not the tiny random-weight twins).

TeaCache rescales the relative change of a time signal with a polynomial (highest degree first,
as numpy's `poly1d`) into an estimate of the model output's change. Signal `e` is the time
embedding, `e0` the time projection (the six modulation vectors per block).
- Wan2.1 (ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py; the same arrays appear in
  LightX2V's configs and kijai's ComfyUI-WanVideoWrapper): T2V-14B and I2V-14B at 480P and 720P,
  for both signals.
- Wan2.2 TI2V-5B (LightX2V, configs/caching/teacache/wan_ti2v_tea_720p.json, added 2025-07-31;
  signal `e`, degree 5, calibrated at 704x1280, 121 frames, 50 steps, threshold 0.26).
- Wan2.2 T2V-A14B / I2V-A14B: none published. kijai's wrapper uses the Wan2.1 14B arrays as
  declared placeholders; here they can be chosen by name, and `auto` uses none (the raw change).

MagCache (Zehong-Ma/MagCache, MagCache4Wan2.2/magcache_generate.py) gives, per model call, the
calibrated ratio of the residual's magnitude to the previous call's, interleaved [cond, uncond]
for steps 1 .. N-1 (the runtime puts 1.0 in front for step 0). The A14B lists cover both experts
in one list (the drop at the expert switch is the switch itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

TIME_EMBEDDING = "e"  # WanDiT.embed_time's first output: (B, Lt, D)
TIME_PROJECTION = "e0"  # its second output: (B, Lt, 6, D)
TEACACHE_SIGNALS = (TIME_EMBEDDING, TIME_PROJECTION)
RAW_CHANGE = "none"  # TeaCache without a polynomial: the relative change of e0 itself


@dataclass(frozen=True, kw_only=True)
class TeaCacheCoefficients:
    """One published TeaCache polynomial: the signal it rescales, its coefficients, its source."""

    signal: str
    poly: tuple[float, ...]  # highest degree first
    source: str


@dataclass(frozen=True, kw_only=True)
class MagCacheRatios:
    """One published MagCache calibration: interleaved [cond, uncond] ratios for steps 1 .. steps-1."""

    steps: int
    interleaved: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.interleaved) != 2 * (self.steps - 1):
            raise ValueError(f"{self.source}: {len(self.interleaved)} ratios for {self.steps} steps; "
                             f"expected {2 * (self.steps - 1)}")

    def branch(self, index: int) -> tuple[float, ...]:
        """Ratios of one branch (0 = cond, 1 = uncond) for steps 0 .. steps-1 (1.0 for step 0)."""
        return (1.0, *self.interleaved[index::2])


_TEA21 = "ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py"
_TEA_TI2V = "LightX2V configs/caching/teacache/wan_ti2v_tea_720p.json"
TEACACHE_COEFFICIENTS: Mapping[str, TeaCacheCoefficients] = MappingProxyType({
    "wan2.2_ti2v_5B": TeaCacheCoefficients(
        signal=TIME_EMBEDDING, source=_TEA_TI2V,
        poly=(1.57472669e+05, -1.15702395e+05, 3.10761669e+04, -3.83116651e+03, 2.21608777e+02, -4.81179567e+00)),
    "wan2.1_t2v_14B_e": TeaCacheCoefficients(
        signal=TIME_EMBEDDING, source=_TEA21,
        poly=(-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)),
    "wan2.1_t2v_14B_e0": TeaCacheCoefficients(
        signal=TIME_PROJECTION, source=_TEA21,
        poly=(-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01)),
    "wan2.1_i2v_14B_480p_e": TeaCacheCoefficients(
        signal=TIME_EMBEDDING, source=_TEA21,
        poly=(-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01)),
    "wan2.1_i2v_14B_480p_e0": TeaCacheCoefficients(
        signal=TIME_PROJECTION, source=_TEA21,
        poly=(2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01)),
    "wan2.1_i2v_14B_720p_e": TeaCacheCoefficients(
        signal=TIME_EMBEDDING, source=_TEA21,
        poly=(-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683)),
    "wan2.1_i2v_14B_720p_e0": TeaCacheCoefficients(
        signal=TIME_PROJECTION, source=_TEA21,
        poly=(8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02)),
})

_MAG22 = "Zehong-Ma/MagCache, MagCache4Wan2.2/magcache_generate.py"
MAGCACHE_RATIOS: Mapping[str, MagCacheRatios] = MappingProxyType({
    "wan2.2_t2v_A14B": MagCacheRatios(steps=40, source=_MAG22, interleaved=(
        1.00124, 1.00155, 0.99822, 0.99851, 0.99696, 0.99687, 0.99703, 0.99732, 0.9966, 0.99679,
        0.99602, 0.99658, 0.99578, 0.99664, 0.99484, 0.9949, 0.99633, 0.996, 0.99659, 0.99683,
        0.99534, 0.99549, 0.99584, 0.99577, 0.99681, 0.99694, 0.99563, 0.99554, 0.9944, 0.99473,
        0.99594, 0.9964, 0.99466, 0.99461, 0.99453, 0.99481, 0.99389, 0.99365, 0.99391, 0.99406,
        0.99354, 0.99361, 0.99283, 0.99278, 0.99268, 0.99263, 0.99057, 0.99091, 0.99125, 0.99126,
        0.65523, 0.65252, 0.98808, 0.98852, 0.98765, 0.98736, 0.9851, 0.98535, 0.98311, 0.98339,
        0.9805, 0.9806, 0.97776, 0.97771, 0.97278, 0.97286, 0.96731, 0.96728, 0.95857, 0.95855,
        0.94385, 0.94385, 0.92118, 0.921, 0.88108, 0.88076, 0.80263, 0.80181)),
    "wan2.2_i2v_A14B": MagCacheRatios(steps=40, source=_MAG22, interleaved=(
        0.99191, 0.99144, 0.99356, 0.99337, 0.99326, 0.99285, 0.99251, 0.99264, 0.99393, 0.99366,
        0.9943, 0.9943, 0.99276, 0.99288, 0.99389, 0.99393, 0.99274, 0.99289, 0.99316, 0.9931,
        0.99379, 0.99377, 0.99268, 0.99271, 0.99222, 0.99227, 0.99175, 0.9916, 0.91076, 0.91046,
        0.98931, 0.98933, 0.99087, 0.99088, 0.98852, 0.98855, 0.98895, 0.98896, 0.98806, 0.98808,
        0.9871, 0.98711, 0.98613, 0.98618, 0.98434, 0.98435, 0.983, 0.98307, 0.98185, 0.98187,
        0.98131, 0.98131, 0.9783, 0.97835, 0.97619, 0.9762, 0.97264, 0.9727, 0.97088, 0.97098,
        0.96568, 0.9658, 0.96045, 0.96055, 0.95322, 0.95335, 0.94579, 0.94594, 0.93297, 0.93311,
        0.91699, 0.9172, 0.89174, 0.89202, 0.8541, 0.85446, 0.79823, 0.79902)),
    "wan2.2_ti2v_5B_t2v": MagCacheRatios(steps=50, source=_MAG22, interleaved=(
        0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548,
        0.99468, 0.9946, 0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441,
        0.99409, 0.99398, 0.99403, 0.99397, 0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378,
        0.9933, 0.99328, 0.99303, 0.99301, 0.99217, 0.99216, 0.992, 0.99201, 0.99201, 0.99202,
        0.99133, 0.99132, 0.99112, 0.9911, 0.99155, 0.99155, 0.98958, 0.98957, 0.98959, 0.98958,
        0.98838, 0.98835, 0.98826, 0.98825, 0.9883, 0.98828, 0.98711, 0.98709, 0.98562, 0.98561,
        0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282, 0.98104, 0.98101, 0.97981, 0.97979,
        0.97849, 0.97849, 0.97557, 0.97554, 0.97398, 0.97395, 0.97171, 0.97166, 0.96917, 0.96913,
        0.96511, 0.96507, 0.96263, 0.96257, 0.95839, 0.95835, 0.95483, 0.95475, 0.94942, 0.94936,
        0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872, 0.96949, 0.97015)),
    "wan2.2_ti2v_5B_i2v": MagCacheRatios(steps=50, source=_MAG22, interleaved=(
        0.99512, 0.99559, 0.99559, 0.99561, 0.99595, 0.99577, 0.99512, 0.99512, 0.99546, 0.99534,
        0.99543, 0.99531, 0.99496, 0.99491, 0.99504, 0.99499, 0.99444, 0.99449, 0.99481, 0.99481,
        0.99435, 0.99435, 0.9943, 0.99431, 0.99411, 0.99406, 0.99373, 0.99376, 0.99413, 0.99405,
        0.99363, 0.99359, 0.99335, 0.99331, 0.99244, 0.99243, 0.99229, 0.99229, 0.99239, 0.99236,
        0.99163, 0.9916, 0.99149, 0.99151, 0.99191, 0.99192, 0.9898, 0.98981, 0.9899, 0.98987,
        0.98849, 0.98849, 0.98846, 0.98846, 0.98861, 0.98861, 0.9874, 0.98738, 0.98588, 0.98589,
        0.98539, 0.98534, 0.98444, 0.98439, 0.9831, 0.98309, 0.98119, 0.98118, 0.98001, 0.98,
        0.97862, 0.97859, 0.97555, 0.97558, 0.97392, 0.97388, 0.97152, 0.97145, 0.96871, 0.9687,
        0.96435, 0.96434, 0.96129, 0.96127, 0.95639, 0.95638, 0.95176, 0.95175, 0.94446, 0.94452,
        0.93972, 0.93974, 0.93575, 0.9359, 0.93537, 0.93552, 0.96655, 0.96616)),
})

# What `auto` picks per task model type (and, for TI2V-5B MagCache, with or without a start image).
AUTO_TEACACHE = MappingProxyType({"ti2v": "wan2.2_ti2v_5B", "t2v": RAW_CHANGE, "i2v": RAW_CHANGE})
AUTO_MAGCACHE = MappingProxyType({"t2v": "wan2.2_t2v_A14B", "i2v": "wan2.2_i2v_A14B",
                                  "ti2v": "wan2.2_ti2v_5B_t2v", "ti2v+image": "wan2.2_ti2v_5B_i2v"})

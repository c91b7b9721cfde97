"""Synthetic face-like identities, so the pipeline runs end to end without real data.

Each identity is a fixed set of appearance parameters (face outline and
proportions, skin, hair and eye colours, hair style, facial hair, glasses,
a low-frequency skin texture and moles), drawn once from the identity's own
seed. Each image of it is drawn in a canonical 112x112 frame roughly aligned
to the 5-point ArcFace template (eyes near row 52, mouth near row 92) with
its own pose, expression, lighting, occluders, blur and noise, taken from a
:class:`DomainSettings`. The default model is pretrained on the ``source``
domain. The ``target`` domain (dim, colour-cast light and frequent masks or
sunglasses) is the "user's own" data that fine-tuning adapts to.

Everything is seeded with :class:`numpy.random.Generator` streams derived
from ``(seed, identity)`` and ``(seed, identity, image, domain)``, so the
same arguments give identical pixels and, with the same OpenCV build,
identical JPEG bytes. Images are uint8 BGR, as OpenCV decodes them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import zlib
from dataclasses import dataclass
from typing import Iterator

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from magface_al.data.faces import IDX_NAME, MANIFEST_NAME, PROPERTY_NAME, REC_NAME, write_manifest
from magface_al.data.recordio import IRHeader, RecordIOWriter, pack_payload
from magface_al.utils import write_text_atomic

logger = logging.getLogger(__name__)

IMAGE_SIZE = 112
JPEG_QUALITY = 95

_AA = cv2.LINE_AA
_SHIFT = 4  # fractional bits of drawing coordinates: positions in 1/16 pixel
_SUBPIXEL = 1 << _SHIFT

# Pixel grid of the canonical frame, shared by the mask computations.
_ROWS, _COLS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
# The same grid scaled to -0.5..0.5, for light gradients.
_Y_UNIT, _X_UNIT = _ROWS / IMAGE_SIZE - 0.5, _COLS / IMAGE_SIZE - 0.5


@dataclass(frozen=True)
class DomainSettings:
    """Ranges of the per-image variation of one imaging domain.

    Angles are in degrees, shifts in pixels of the 112x112 frame, probabilities
    in [0, 1]; ``*_range`` fields are (low, high) of a uniform draw.
    """

    name: str
    max_roll: float = 10.0
    max_yaw: float = 0.45  # fraction of a profile turn; moves inner features sideways
    max_pitch: float = 0.3
    scale_range: tuple[float, float] = (0.92, 1.08)
    max_shift: float = 4.0
    brightness_range: tuple[float, float] = (0.75, 1.2)
    contrast_range: tuple[float, float] = (0.8, 1.1)
    max_light_gradient: float = 0.35  # relative brightness change across the face
    colour_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # BGR multipliers of the light
    colour_jitter: float = 0.06
    blur_probability: float = 0.35
    max_blur_sigma: float = 2.2
    noise_probability: float = 0.4
    max_noise_sigma: float = 12.0
    occlusion_probability: float = 0.15
    mask_probability: float = 0.0
    sunglasses_probability: float = 0.03
    expression_strength: float = 1.0

    def __post_init__(self) -> None:
        probabilities = {
            "blur_probability": self.blur_probability,
            "noise_probability": self.noise_probability,
            "occlusion_probability": self.occlusion_probability,
            "mask_probability": self.mask_probability,
            "sunglasses_probability": self.sunglasses_probability,
        }
        for field_name, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"invalid {field_name} {value} for domain {self.name!r}: expected 0..1")
        for field_name in ("scale_range", "brightness_range", "contrast_range"):
            low, high = getattr(self, field_name)
            if not 0 < low <= high:
                raise ValueError(
                    f"invalid {field_name} {(low, high)} for domain {self.name!r}: expected 0 < low <= high"
                )


DOMAINS: dict[str, DomainSettings] = {
    "source": DomainSettings(name="source"),
    # Dim light with a blue-green cast, stronger sensor noise and frequent
    # masks or sunglasses: a camera the source sample never showed.
    "target": DomainSettings(
        name="target",
        brightness_range=(0.45, 0.85),
        contrast_range=(0.6, 0.9),
        max_light_gradient=0.5,
        colour_gains=(1.25, 1.05, 0.7),
        blur_probability=0.4,
        noise_probability=0.7,
        max_noise_sigma=16.0,
        occlusion_probability=0.15,
        mask_probability=0.45,
        sunglasses_probability=0.2,
    ),
}


def get_domain(name: str) -> DomainSettings:
    """Return the settings of a named domain.

    Raises:
        ValueError: if ``name`` is not one of :data:`DOMAINS`.
    """
    if name not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {name!r}: expected one of {', '.join(DOMAINS)}")
    return DOMAINS[name]


@dataclass(frozen=True)
class FaceIdentity:
    """The stable appearance of one synthetic person, in canonical-frame pixels."""

    index: int
    face_centre: tuple[float, float]  # (x, y)
    face_half_width: float
    face_half_height: float
    jaw_ratio: float  # width of the lower face relative to the upper face
    skin_bgr: tuple[float, float, float]
    hair_bgr: tuple[float, float, float]
    hair_style: int  # 0 shaved, 1 short, 2 long, 3 fringe
    hairline: float  # row of the hairline at the face centre
    ear_size: float
    eye_half_spacing: float
    eye_row: float
    eye_width: float
    eye_height: float
    iris_bgr: tuple[float, float, float]
    brow_thickness: int
    brow_gap: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_row: float
    mouth_half_width: float
    lip_thickness: int
    lip_bgr: tuple[float, float, float]
    facial_hair: int  # 0 none, 1 moustache, 2 beard
    glasses: bool
    glasses_bgr: tuple[float, float, float]
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    texture_seed: int
    texture_amplitude: float


@dataclass(frozen=True)
class _Pose:
    """The per-image variation drawn for one rendering."""

    yaw: float
    pitch: float
    roll: float
    scale: float
    shift: tuple[float, float]
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float


def _stream(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(v) for v in entropy]))


def _domain_code(name: str) -> int:
    # A stable integer per domain name for seeding (Python's hash() is salted per process).
    return zlib.crc32(name.encode("utf-8"))


def _colour(rng: np.random.Generator, low: float, high: float, size: int = 3) -> tuple[float, ...]:
    return tuple(float(v) for v in rng.uniform(low, high, size))


def _skin_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    # Skin tones lie along a dark-to-light line with red > green > blue in BGR order.
    tone = rng.uniform(0.0, 1.0)
    red = 95 + 150 * tone + rng.normal(0, 8)
    green = red * rng.uniform(0.62, 0.82)
    blue = green * rng.uniform(0.7, 0.92)
    return tuple(float(np.clip(v, 20, 250)) for v in (blue, green, red))


def _hair_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    kind = rng.integers(0, 4)
    if kind == 0:  # black to dark brown
        base = rng.uniform(15, 50)
        return (base * 0.8, base * 0.9, base)
    if kind == 1:  # brown
        base = rng.uniform(50, 110)
        return (base * 0.45, base * 0.7, base)
    if kind == 2:  # blond
        base = rng.uniform(150, 220)
        return (base * 0.55, base * 0.8, base)
    grey = rng.uniform(120, 210)  # grey
    return (grey, grey, grey * 1.02)


def sample_identity(seed: int, index: int) -> FaceIdentity:
    """Draw the appearance of identity ``index``; the same (seed, index) gives the same person."""
    rng = _stream(seed, index)
    half_width = rng.uniform(34, 45)
    half_height = rng.uniform(48, 60)
    skin = _skin_colour(rng)
    hair = _hair_colour(rng)
    moles = tuple(
        (float(rng.uniform(30, 82)), float(rng.uniform(40, 100)), float(rng.uniform(0.8, 2.0)))
        for _ in range(int(rng.integers(0, 4)))
    )
    return FaceIdentity(
        index=int(index),
        face_centre=(float(56 + rng.normal(0, 1.0)), float(rng.uniform(58, 66))),
        face_half_width=float(half_width),
        face_half_height=float(half_height),
        jaw_ratio=float(rng.uniform(0.65, 1.0)),
        skin_bgr=skin,
        hair_bgr=hair,
        hair_style=int(rng.integers(0, 4)),
        hairline=float(rng.uniform(18, 32)),
        ear_size=float(rng.uniform(6, 11)),
        eye_half_spacing=float(rng.uniform(14, 21)),
        eye_row=float(rng.uniform(47, 56)),
        eye_width=float(rng.uniform(6, 10)),
        eye_height=float(rng.uniform(2.5, 4.5)),
        iris_bgr=_colour(rng, 20, 160),
        brow_thickness=int(rng.integers(2, 5)),
        brow_gap=float(rng.uniform(6, 11)),
        brow_tilt=float(rng.uniform(-3, 3)),
        nose_length=float(rng.uniform(13, 24)),
        nose_width=float(rng.uniform(5, 11)),
        mouth_row=float(rng.uniform(86, 96)),
        mouth_half_width=float(rng.uniform(9, 17)),
        lip_thickness=int(rng.integers(2, 5)),
        lip_bgr=(skin[0] * 0.7, skin[1] * 0.6, min(255.0, skin[2] * 0.95)),
        facial_hair=int(rng.choice(3, p=(0.7, 0.15, 0.15))),
        glasses=bool(rng.random() < 0.15),
        glasses_bgr=_colour(rng, 10, 120),
        moles=moles,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        texture_amplitude=float(rng.uniform(6, 22)),
    )


def _sample_pose(rng: np.random.Generator, domain: DomainSettings) -> _Pose:
    strength = domain.expression_strength
    low, high = domain.scale_range
    return _Pose(
        yaw=float(rng.uniform(-1, 1) * domain.max_yaw),
        pitch=float(rng.uniform(-1, 1) * domain.max_pitch),
        roll=float(rng.uniform(-1, 1) * domain.max_roll),
        scale=float(rng.uniform(low, high)),
        shift=(float(rng.uniform(-1, 1) * domain.max_shift), float(rng.uniform(-1, 1) * domain.max_shift)),
        smile=float(rng.uniform(-0.3, 1.0) * strength),
        mouth_open=float(max(0.0, rng.uniform(-0.6, 1.0)) * strength),
        eye_open=float(np.clip(1.0 - max(0.0, rng.uniform(-1.5, 1.0)) * strength, 0.1, 1.0)),
        brow_raise=float(rng.uniform(-1, 1) * strength),
    )


def _fixed(points: np.ndarray) -> np.ndarray:
    """Convert float pixel coordinates to the fixed-point integers OpenCV draws with."""
    return np.round(np.asarray(points, dtype=np.float64) * _SUBPIXEL).astype(np.int32)


def _ellipse(image: np.ndarray, center, axes, angle: float, colour, thickness: int = -1) -> None:
    cv2.ellipse(
        image,
        tuple(int(v) for v in _fixed(center)),
        tuple(int(v) for v in _fixed(np.maximum(axes, 0.5))),
        angle,
        0,
        360,
        colour,
        thickness,
        _AA,
        _SHIFT,
    )


def _polyline(image: np.ndarray, points: np.ndarray, colour, thickness: int) -> None:
    cv2.polylines(image, [_fixed(points)], False, colour, thickness, _AA, _SHIFT)


def _curve(x0: float, x1: float, row: float, bend: float, count: int = 9) -> np.ndarray:
    """Points of a parabola from x0 to x1 at ``row`` whose middle is ``bend`` pixels lower."""
    xs = np.linspace(x0, x1, count)
    t = np.linspace(-1, 1, count)
    return np.stack([xs, row + bend * (1 - t**2)], axis=1)


def _face_outline(identity: FaceIdentity, yaw: float) -> np.ndarray:
    cx, cy = identity.face_centre
    cx += 2.5 * yaw
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    xs = np.cos(angles) * identity.face_half_width
    ys = np.sin(angles) * identity.face_half_height
    lower = ys > 0
    # The lower half narrows towards the chin according to the jaw ratio.
    taper = 1 - (1 - identity.jaw_ratio) * (ys / identity.face_half_height) ** 2
    xs = np.where(lower, xs * taper, xs)
    return np.stack([cx + xs, cy + ys], axis=1)


@functools.lru_cache(maxsize=8)
def _skin_layer(skin_bgr: tuple[float, float, float], texture_seed: int, amplitude: float) -> np.ndarray:
    """Build the identity's skin colour plus its low-frequency texture, float32 (112, 112, 3).

    The result is cached because every image of an identity reuses it; callers must not modify it.
    """
    rng = np.random.default_rng(texture_seed)
    coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
    coarse[..., 1:] = coarse[..., :1] * 0.8 + coarse[..., 1:] * 0.2  # mostly brightness, a little hue
    texture = cv2.resize(coarse, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC) * amplitude
    layer = np.array(skin_bgr, np.float32) + texture
    layer.flags.writeable = False
    return layer


def _draw_hair_back(canvas: np.ndarray, identity: FaceIdentity, yaw: float) -> None:
    if identity.hair_style != 2:
        return
    cx, cy = identity.face_centre
    axes = (identity.face_half_width + 9, identity.face_half_height + 8)
    _ellipse(canvas, (cx + 2.5 * yaw, cy + 6), axes, 0, identity.hair_bgr)


def _draw_ears(canvas: np.ndarray, identity: FaceIdentity, pose: _Pose) -> None:
    cx, _ = identity.face_centre
    row = identity.eye_row + 8
    for side in (-1, 1):
        # The ear on the side the face turns away from shows less.
        visible = 1 - max(0.0, side * pose.yaw) * 1.6
        if visible <= 0.15:
            continue
        x = cx + side * (identity.face_half_width - 1) + 2.5 * pose.yaw
        axes = (identity.ear_size * 0.55 * visible, identity.ear_size)
        shade = tuple(c * 0.92 for c in identity.skin_bgr)
        _ellipse(canvas, (x, row), axes, 0, shade)


def _hair_cap_mask(identity: FaceIdentity, face_mask: np.ndarray, pose: _Pose) -> np.ndarray:
    cx, _ = identity.face_centre
    offset = (_COLS - cx - 2.5 * pose.yaw) / identity.face_half_width
    if identity.hair_style == 3:  # fringe: low straight edge
        hairline = identity.hairline + 8 + 2 * offset
    else:  # receding at the temples
        hairline = identity.hairline + 14 * offset**2
    hairline = hairline + 3 * pose.pitch
    cap = (_ROWS < hairline) & (face_mask > 0)
    return cap


def _draw_eyes(canvas: np.ndarray, identity: FaceIdentity, pose: _Pose, centres: list[tuple[float, float]]) -> None:
    for side, (x, y) in zip((-1, 1), centres):
        # The far eye looks narrower when the head turns.
        width = identity.eye_width * (1 - 0.35 * max(0.0, side * pose.yaw))
        height = identity.eye_height * pose.eye_open
        _ellipse(canvas, (x, y), (width, max(height, 0.6)), 0, (235, 235, 235))
        if height > 1.0:
            iris_x = x + 2.0 * pose.yaw
            radius = min(identity.eye_height * 0.95, width * 0.5)
            _ellipse(canvas, (iris_x, y), (radius, min(radius, height)), 0, identity.iris_bgr)
            _ellipse(canvas, (iris_x, y), (radius * 0.4, min(radius * 0.4, height)), 0, (15, 15, 15))
        lid = tuple(c * 0.55 for c in identity.skin_bgr)
        _polyline(canvas, _curve(x - width, x + width, y - height * 0.2, -height * 0.8), lid, 1)


def _draw_brows(canvas: np.ndarray, identity: FaceIdentity, pose: _Pose, centres: list[tuple[float, float]]) -> None:
    colour = tuple(c * 0.8 for c in identity.hair_bgr)
    for side, (x, y) in zip((-1, 1), centres):
        row = y - identity.brow_gap - 2.0 * pose.brow_raise
        inner = x - side * identity.eye_width * 0.9
        outer = x + side * identity.eye_width * 1.2
        points = np.array(
            [[inner, row + identity.brow_tilt * 0.5], [x, row - 1.5], [outer, row - identity.brow_tilt * 0.5]]
        )
        _polyline(canvas, points, colour, identity.brow_thickness)


def _draw_nose(canvas: np.ndarray, identity: FaceIdentity, pose: _Pose, bridge: tuple[float, float]) -> None:
    x, y = bridge
    tip_x = x + 5.0 * pose.yaw
    tip_y = y + identity.nose_length * (1 - 0.15 * pose.pitch)
    shade = tuple(c * 0.7 for c in identity.skin_bgr)
    side = 1 if pose.yaw >= 0 else -1
    _polyline(canvas, np.array([[x + side * 2, y], [tip_x + side * 2.5, tip_y - 2]]), shade, 1)
    half = identity.nose_width * 0.5
    for direction in (-1, 1):
        _ellipse(canvas, (tip_x + direction * half * 0.6, tip_y), (1.6, 1.0), 0, tuple(c * 0.45 for c in shade))
    _polyline(canvas, _curve(tip_x - half, tip_x + half, tip_y - 1, 2.0), shade, 1)


def _draw_mouth(canvas: np.ndarray, identity: FaceIdentity, pose: _Pose, centre: tuple[float, float]) -> None:
    x, y = centre
    half = identity.mouth_half_width * (1 + 0.12 * pose.smile)
    if pose.mouth_open > 0.2:
        opening = 1.5 + 5.0 * pose.mouth_open
        _ellipse(canvas, (x, y + opening * 0.4), (half * 0.8, opening), 0, (40, 30, 60))
    bend = 3.0 * pose.smile
    _polyline(canvas, _curve(x - half, x + half, y, bend), identity.lip_bgr, identity.lip_thickness)


def _draw_facial_hair(canvas: np.ndarray, identity: FaceIdentity, face_mask: np.ndarray, mouth: tuple[float, float]) -> None:
    if identity.facial_hair == 0:
        return
    x, y = mouth
    colour = np.array(identity.hair_bgr, dtype=np.float32)
    if identity.facial_hair == 1:
        points = _curve(x - identity.mouth_half_width - 1, x + identity.mouth_half_width + 1, y - 4, -2.0)
        _polyline(canvas, points, tuple(colour.tolist()), 3)
        return
    region = (face_mask > 0) & (_ROWS > y - 6)
    region &= ~((np.abs(_COLS - x) < identity.mouth_half_width + 1) & (np.abs(_ROWS - y) < 3))
    canvas[region] = canvas[region] * 0.25 + colour * 0.75


def _draw_glasses(canvas: np.ndarray, identity: FaceIdentity, centres: list[tuple[float, float]], dark: bool) -> None:
    colour = (25, 25, 25) if dark else identity.glasses_bgr
    radius = identity.eye_width + 3
    for x, y in centres:
        if dark:
            _ellipse(canvas, (x, y), (radius, radius * 0.75), 0, (20, 20, 25))
        _ellipse(canvas, (x, y), (radius, radius * 0.75), 0, colour, 2)
    (lx, ly), (rx, ry) = centres
    _polyline(canvas, np.array([[lx + radius, ly], [rx - radius, ry]]), colour, 2)


def _draw_mask(canvas: np.ndarray, identity: FaceIdentity, rng: np.random.Generator, nose_row: float) -> None:
    """Draw a surgical-style mask from the nose down, in a colour drawn per image."""
    cx, cy = identity.face_centre
    top = nose_row - rng.uniform(4, 9)
    bottom = cy + identity.face_half_height * 0.85
    colour = tuple(float(v) for v in rng.choice([(200, 160, 90), (235, 235, 235), (40, 40, 40), (150, 190, 120)]))
    half = identity.face_half_width * 0.95
    points = np.array([[cx - half, top + 4], [cx, top - 2], [cx + half, top + 4], [cx + half * 0.8, bottom], [cx - half * 0.8, bottom]])
    cv2.fillPoly(canvas, [_fixed(points)], colour, _AA, _SHIFT)


def _draw_occluder(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Draw an opaque blob of random colour over part of the face, like a hand, a cup or a hat brim."""
    colour = _colour(rng, 20, 230)
    centre = (rng.uniform(20, 92), rng.uniform(30, 105))
    axes = (rng.uniform(10, 26), rng.uniform(8, 20))
    _ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), colour)


def _draw_face(identity: FaceIdentity, pose: _Pose, domain: DomainSettings, rng: np.random.Generator) -> np.ndarray:
    """Draw the face in the canonical frame (before the pose warp and the light), float32 BGR."""
    background = np.array(_colour(rng, 30, 220), dtype=np.float32)
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = background
    canvas += _Y_UNIT[..., None] * np.float32(rng.uniform(-40, 40))

    _draw_hair_back(canvas, identity, pose.yaw)
    _draw_ears(canvas, identity, pose)
    face_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    cv2.fillPoly(face_mask, [_fixed(_face_outline(identity, pose.yaw))], 255, _AA, _SHIFT)
    alpha = (face_mask.astype(np.float32) / 255)[..., None]
    skin = _skin_layer(identity.skin_bgr, identity.texture_seed, identity.texture_amplitude)
    canvas = canvas * (1 - alpha) + skin * alpha

    for x, y, radius in identity.moles:
        _ellipse(canvas, (x + 3 * pose.yaw, y + 2 * pose.pitch), (radius, radius), 0, tuple(c * 0.5 for c in identity.skin_bgr))
    if identity.hair_style != 0:
        cap = _hair_cap_mask(identity, face_mask, pose)
        canvas[cap] = np.array(identity.hair_bgr, np.float32)

    cx, _ = identity.face_centre
    eye_row = identity.eye_row + 3.0 * pose.pitch
    eye_x = cx + 4.0 * pose.yaw
    eyes = [(eye_x - identity.eye_half_spacing, eye_row), (eye_x + identity.eye_half_spacing, eye_row)]
    mouth = (cx + 4.0 * pose.yaw, identity.mouth_row + 2.0 * pose.pitch)
    nose_top = (eye_x, eye_row + 2)
    _draw_eyes(canvas, identity, pose, eyes)
    _draw_brows(canvas, identity, pose, eyes)
    _draw_nose(canvas, identity, pose, nose_top)
    _draw_facial_hair(canvas, identity, face_mask, mouth)
    _draw_mouth(canvas, identity, pose, mouth)

    sunglasses = rng.random() < domain.sunglasses_probability
    if identity.glasses or sunglasses:
        _draw_glasses(canvas, identity, eyes, dark=sunglasses)
    if rng.random() < domain.mask_probability:
        _draw_mask(canvas, identity, rng, nose_top[1] + identity.nose_length * 0.6)
    if rng.random() < domain.occlusion_probability:
        _draw_occluder(canvas, rng)
    return canvas


def _warp(canvas: np.ndarray, pose: _Pose) -> np.ndarray:
    centre = (IMAGE_SIZE / 2, IMAGE_SIZE / 2)
    matrix = cv2.getRotationMatrix2D(centre, pose.roll, pose.scale)
    matrix[:, 2] += pose.shift
    return cv2.warpAffine(canvas, matrix, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _apply_light(image: np.ndarray, domain: DomainSettings, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    strength = 2 * rng.uniform(0, domain.max_light_gradient)
    gradient = cv2.addWeighted(_X_UNIT, strength * np.cos(angle), _Y_UNIT, strength * np.sin(angle), 1.0)
    gains = np.array(domain.colour_gains, np.float32) * (1 + rng.normal(0, domain.colour_jitter, 3)).astype(np.float32)
    brightness = rng.uniform(*domain.brightness_range)
    contrast = rng.uniform(*domain.contrast_range)
    mean = float(image.mean())
    # (x - mean) * contrast + mean, then the light: one pass per step over the image.
    image = cv2.addWeighted(image, contrast, image, 0.0, mean * (1 - contrast))
    light = (gradient * np.float32(brightness))[..., None] * gains
    return image * light


def _degrade(image: np.ndarray, domain: DomainSettings, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < domain.blur_probability:
        sigma = rng.uniform(0.5, domain.max_blur_sigma)
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    if rng.random() < domain.noise_probability:
        sigma = rng.uniform(2, domain.max_noise_sigma)
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return image


def render_face(identity: FaceIdentity, image_index: int, domain: DomainSettings, *, seed: int) -> np.ndarray:
    """Render image ``image_index`` of ``identity`` in ``domain`` as uint8 BGR (112, 112, 3).

    The per-image variation comes from its own stream, seeded by
    ``(seed, identity.index, image_index, domain name)``.
    """
    rng = _stream(seed, identity.index, image_index, _domain_code(domain.name))
    pose = _sample_pose(rng, domain)
    canvas = _draw_face(identity, pose, domain, rng)
    image = _warp(canvas, pose)
    image = _apply_light(image, domain, rng)
    image = _degrade(image, domain, rng)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_jpeg(image_bgr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Encode a BGR image as JPEG bytes, as InsightFace's packers do."""
    ok, buffer = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode an image of shape {image_bgr.shape} as JPEG")
    return buffer.tobytes()


def iter_faces(
    identities: int,
    images_per_identity: int,
    *,
    domain: str = "source",
    seed: int = 0,
    first_identity: int = 0,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(identity index, image index, BGR image)`` for a block of synthetic identities.

    Identities ``first_identity .. first_identity + identities - 1`` are
    drawn, so disjoint blocks of the same seed never share a person.

    Raises:
        ValueError: if a count is not positive or the domain is unknown.
    """
    if identities < 1:
        raise ValueError(f"invalid identities {identities}: expected at least 1")
    if images_per_identity < 1:
        raise ValueError(f"invalid images_per_identity {images_per_identity}: expected at least 1")
    settings = get_domain(domain)
    for index in range(first_identity, first_identity + identities):
        identity = sample_identity(seed, index)
        for image_index in range(images_per_identity):
            yield index, image_index, render_face(identity, image_index, settings, seed=seed)


def with_overrides(domain: DomainSettings, **changes: object) -> DomainSettings:
    """Return a copy of ``domain`` with some settings changed (validated like the original)."""
    return dataclasses.replace(domain, **changes)


def identity_name(domain: str, index: int) -> str:
    """Return the manifest name of a synthetic identity, e.g. ``source_00012``."""
    return f"{domain}_{index:05d}"


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    identities: int,
    images_per_identity: int,
    domain: str = "source",
    seed: int = 0,
    first_identity: int = 0,
    jpeg_quality: int = JPEG_QUALITY,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Render a block of synthetic identities into a RecordIO dataset folder.

    The folder gets ``train.rec``, ``train.idx``, ``property`` and
    ``manifest.csv`` in the layout of InsightFace's datasets, byte for byte
    what :func:`magface_al.data.pack.pack_folder` writes for the same
    pixels: key 0 is the header record with the label array ``(K, M)``,
    keys ``1..K-1`` are JPEG images (scalar label = identity 0..N-1, in
    ``first_identity`` order), keys ``K..M-1`` hold each identity's
    ``[start, end)`` image-key range, and the header record comes last in
    the file. Each file is written atomically, and the manifest's
    ``source_file`` is a virtual ``<identity>/<image>.jpg`` path.

    Returns:
        The manifest rows (``key,identity,label,source_file``).

    Raises:
        ValueError: if a count is not positive, the domain is unknown or the
            JPEG quality is outside 1..100.
    """
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"invalid jpeg_quality {jpeg_quality}: expected an integer from 1 to 100")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    faces = iter_faces(identities, images_per_identity, domain=domain, seed=seed, first_identity=first_identity)
    total = identities * images_per_identity
    first_identity_key = total + 1
    rows: list[dict[str, Any]] = []
    with RecordIOWriter(out_dir / REC_NAME, out_dir / IDX_NAME) as writer:
        for key, (index, image_index, image) in enumerate(
            tqdm(faces, total=total, desc=f"rendering {domain} faces", unit="img", disable=not progress), start=1
        ):
            label = index - first_identity
            writer.write(key, pack_payload(IRHeader(0, float(label), key, 0), encode_jpeg(image, jpeg_quality)))
            name = identity_name(domain, index)
            rows.append({"key": key, "identity": name, "label": label, "source_file": f"{name}/{image_index:04d}.jpg"})
        for label in range(identities):
            start = 1 + label * images_per_identity
            key = first_identity_key + label
            value = np.array([start, start + images_per_identity], dtype=np.float32)
            writer.write(key, pack_payload(IRHeader(0, value, key, 0)))
        # id2 = 1 in the header record, as in the datasets InsightFace distributes.
        header = np.array([first_identity_key, first_identity_key + identities], dtype=np.float32)
        writer.write(0, pack_payload(IRHeader(0, header, 0, 1)))
    write_text_atomic(out_dir / PROPERTY_NAME, f"{identities},{IMAGE_SIZE},{IMAGE_SIZE}\n")
    write_manifest(out_dir / MANIFEST_NAME, rows)
    logger.info(
        "wrote %d %s-domain images of %d synthetic identities (from %d, seed %d) into %s",
        total,
        domain,
        identities,
        first_identity,
        seed,
        out_dir,
    )
    return rows

"""Label tables against independent tables written out here (docs/method.md §4)."""

from __future__ import annotations

import numpy as np
import pytest

from recyclelora.data import labels as L

from .fake_datasets import MAPILLARY_V12_NAMES, make_mapillary

# The official Cityscapes label definition (cityscapesScripts' labels.py): id -> trainId for the
# 34 ids 0..33 (license plate, id -1, never appears in label files).
CITYSCAPES_ID_TO_TRAIN = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

CITYSCAPES_TRAIN_COLORS = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]

# docs/method.md §4, SYNTHIA RAND_CITYSCAPES.
SYNTHIA_TABLE = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN = range(10)
SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BIKE = range(10, 19)
IGN = 255

# The docs/method.md §4 rules applied by hand to every v1.2 label name.
MAPILLARY_EXPECTED = {
    "Bird": IGN,
    "Ground Animal": IGN,
    "Curb": SIDEWALK,
    "Fence": FENCE,
    "Guard Rail": IGN,
    "Barrier": IGN,
    "Wall": WALL,
    "Bike Lane": ROAD,
    "Crosswalk - Plain": ROAD,
    "Curb Cut": SIDEWALK,
    "Parking": ROAD,
    "Pedestrian Area": SIDEWALK,
    "Rail Track": IGN,  # "railtrack" does not contain "onrail"
    "Road": ROAD,
    "Service Lane": ROAD,
    "Sidewalk": SIDEWALK,
    "Bridge": IGN,
    "Building": BUILDING,
    "Tunnel": IGN,
    "Person": PERSON,
    "Bicyclist": RIDER,
    "Motorcyclist": RIDER,
    "Other Rider": RIDER,
    "Lane Marking - Crosswalk": ROAD,
    "Lane Marking - General": ROAD,
    "Mountain": IGN,
    "Sand": IGN,
    "Sky": SKY,
    "Snow": IGN,
    "Terrain": TERRAIN,
    "Vegetation": VEG,
    "Water": IGN,
    "Banner": IGN,
    "Bench": IGN,
    "Bike Rack": IGN,
    "Billboard": IGN,
    "Catch Basin": IGN,
    "CCTV Camera": IGN,
    "Fire Hydrant": IGN,
    "Junction Box": IGN,
    "Mailbox": IGN,
    "Manhole": IGN,
    "Phone Booth": IGN,
    "Pothole": IGN,
    "Street Light": POLE,
    "Pole": POLE,
    "Traffic Sign Frame": SIGN,  # contains "trafficsign", tried before "pole"
    "Utility Pole": POLE,
    "Traffic Light": LIGHT,
    "Traffic Sign (Back)": SIGN,
    "Traffic Sign (Front)": SIGN,
    "Trash Can": IGN,
    "Bicycle": BIKE,
    "Boat": IGN,
    "Bus": BUS,
    "Car": CAR,
    "Caravan": IGN,
    "Motorcycle": MOTO,
    "On Rails": TRAIN,
    "Other Vehicle": IGN,
    "Trailer": IGN,
    "Truck": TRUCK,
    "Wheeled Slow": IGN,
    "Car Mount": IGN,
    "Ego Vehicle": IGN,
    "Unlabeled": IGN,
}


def test_class_names_and_constants():
    assert L.NUM_CLASSES == 19 and L.IGNORE_INDEX == 255
    assert L.CLASS_NAMES == (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
        "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
        "bus", "train", "motorcycle", "bicycle",
    )  # fmt: skip


def test_cityscapes_lut_matches_official_table():
    lut = L.cityscapes_lut()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    for i in range(256):
        assert lut[i] == CITYSCAPES_ID_TO_TRAIN.get(i, 255), i
    assert sorted(set(lut[:34]) - {255}) == list(range(19))


def test_palette_is_cityscapes_colours():
    pal = L.palette()
    assert pal.shape == (19, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal, np.array(CITYSCAPES_TRAIN_COLORS, np.uint8))
    ids = np.array([[0, 10], [255, 18]])
    rgb = L.colorize(ids)
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[1, 0]) == (0, 0, 0)


def test_synthia_lut_matches_reference_table():
    lut = L.synthia_lut()
    assert lut.dtype == np.uint8 and lut.shape == (65536,)
    expected = np.full(65536, 255, np.uint8)
    for k, v in SYNTHIA_TABLE.items():
        expected[k] = v
    np.testing.assert_array_equal(lut, expected)
    assert lut[0] == 255 and lut[13] == 255 and lut[22] == 255  # void, ..., lanemarking


def test_urbansyn_and_bdd_luts():
    for lut in (L.urbansyn_lut(), L.bdd100k_lut(), L.train_id_lut()):
        assert lut.dtype == np.uint8 and lut.shape == (256,)
        np.testing.assert_array_equal(lut[:19], np.arange(19))
        assert (lut[19:] == 255).all()  # UrbanSyn's 19 = unlabelled


def test_mapillary_mapping_all_66_names():
    assert len(MAPILLARY_V12_NAMES) == 66 and set(MAPILLARY_EXPECTED) == set(MAPILLARY_V12_NAMES)
    for name in MAPILLARY_V12_NAMES:
        assert L.mapillary_name_to_train_id(name) == MAPILLARY_EXPECTED[name], name
    lut = L.mapillary_lut(MAPILLARY_V12_NAMES)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    expected = [MAPILLARY_EXPECTED[n] for n in MAPILLARY_V12_NAMES]
    np.testing.assert_array_equal(lut[:66], expected)
    assert (lut[66:] == 255).all()
    # every train class is reachable from Mapillary
    assert set(expected) - {255} == set(range(19))


def test_mapillary_lut_from_config_file(tmp_path):
    rel = make_mapillary(tmp_path, sizes=((8, 8),))
    names = L.read_mapillary_names(rel.root / "config_v1.2.json")
    assert names == list(MAPILLARY_V12_NAMES)
    np.testing.assert_array_equal(
        L.mapillary_lut(rel.root / "config_v1.2.json"), L.mapillary_lut(MAPILLARY_V12_NAMES)
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": []}')
    with pytest.raises(ValueError, match="readable"):
        L.read_mapillary_names(bad)


def test_apply_lut_handles_dtypes_and_out_of_range():
    lut = L.cityscapes_lut()
    a8 = np.array([[7, 8], [33, 34]], np.uint8)
    np.testing.assert_array_equal(L.apply_lut(a8, lut), [[0, 1], [18, 255]])
    a16 = np.array([[7, 300], [65535, 26]], np.uint16)
    np.testing.assert_array_equal(L.apply_lut(a16, lut), [[0, 255], [255, 13]])
    a64 = np.array([-1, 7, 1000])
    np.testing.assert_array_equal(L.apply_lut(a64, lut), [255, 0, 255])
    s16 = np.array([3, 21, 22, 1000], np.uint16)
    np.testing.assert_array_equal(L.apply_lut(s16, L.synthia_lut()), [0, 3, 255, 255])
    assert not lut.flags.writeable  # shared tables are read-only

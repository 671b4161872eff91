"""Package layout: five top-level folders under one import namespace (see DESIGN.md).

setuptools' ``package-dir`` maps ``edgecells.edge`` -> ``edge/`` and so on; sub-packages
are discovered here so that a new folder with an ``__init__.py`` needs no edit.
"""

from setuptools import find_packages, setup

ROOTS = {
    "edgecells": "edgecells",
    "edgecells.edge": "edge",
    "edgecells.calibration": "calibration",
    "edgecells.training": "training",
    "edgecells.convert": "convert",
}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=ROOTS,
    package_data={
        "edgecells.edge": ["data/*", "data/**/*"],
        "edgecells.calibration": ["data/*", "data/**/*"],
        "edgecells.training": ["data/*", "data/**/*"],
        "edgecells.convert": ["data/*", "data/**/*"],
    },
    include_package_data=True,
)

"""ament_python build of apr_localizer (runtime) and apr_training (training, evaluation, export)."""

from glob import glob

from setuptools import find_packages, setup

package_name = "apr_localizer"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={"apr_localizer": ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml")),
        ("share/" + package_name + "/config/training", glob("config/training/*.yaml")),
        ("share/" + package_name + "/rviz", glob("rviz/*.rviz")),
    ],
    install_requires=["setuptools"],
    # ONNX Runtime's CUDA build provides the same `onnxruntime` module as the pinned CPU package: uninstall
    # onnxruntime first, never have both (docs/deployment.md).
    extras_require={"ort-gpu": ["onnxruntime-gpu==1.31.1"]},
    python_requires=">=3.10",
    zip_safe=False,
    maintainer="apr_localizer developers",
    maintainer_email="dev@apr-localizer.local",
    description="Single-frame camera relocalization (MS-Transformer + iAPR) for ROS 2.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "localizer_node = apr_localizer.node:main",
            "apr-train = apr_training.cli:train_main",
            "apr-eval = apr_training.cli:eval_main",
            "apr-export = apr_training.cli:export_main",
            "apr-bench = apr_training.cli:bench_main",
            "apr-synth = apr_training.cli:synth_main",
            "apr-eval-bag = apr_training.cli:eval_bag_main",
            "apr-pairs = apr_training.cli.pairs:main",
            "apr-data = apr_training.cli.data:main",
        ],
    },
)

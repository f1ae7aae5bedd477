"""apr_localizer: single-frame camera relocalization with MS-Transformer + iAPR (ROS-free core)."""

__version__ = "0.1.0"

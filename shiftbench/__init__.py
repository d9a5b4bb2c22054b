"""shiftbench: does a segmentation model still know when it is wrong under image corruptions?"""

__version__ = "0.1.0"

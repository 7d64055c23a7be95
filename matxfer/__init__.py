"""matxfer: how much does a foundation model's pretraining transfer to Matbench properties?"""

__version__ = "0.1.0"

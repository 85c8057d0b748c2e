"""Datasets by name, class selection and splits. Images come unnormalised in [0, 1]."""

from modellego.data.datasets import FolderImages, TensorImages, dataset_names, load
from modellego.data.spec import InputSpec
from modellego.data.subsets import SampleSubset, holdout_split, per_class_slice, resolve_classes, select_classes
from modellego.data.task import TaskData, task_data

__all__ = [
    "FolderImages", "InputSpec", "SampleSubset", "TaskData", "task_data", "TensorImages", "dataset_names", "holdout_split", "load",
    "per_class_slice", "resolve_classes", "select_classes",
]

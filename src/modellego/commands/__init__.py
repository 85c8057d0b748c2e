"""One function per command, one flow each, for every model kind (the kind's verbs do what differs): what the
command line calls, and what a Python user calls to work with files. Each returns a typed result."""

from modellego.commands.assemble import Assembled, assemble, assembly, choose_calibration, own_split, scaled
from modellego.commands.common import assembly_base, union
from modellego.commands.demo import run_demo
from modellego.commands.disassemble import (
                                            Disassembled,
                                            ProfileSampleCheck,
                                            component,
                                            component_metrics,
                                            disassemble,
                                            pareto_front,
)
from modellego.commands.evaluate import ProfileInfo, compare, evaluate_file, info, stored_training_data
from modellego.commands.export import Exported, export
from modellego.commands.figures import Heatmap, heatmap, profile_layers, route
from modellego.commands.imported import import_model
from modellego.commands.profile import profile
from modellego.commands.train import finetune, train
from modellego.data.task import DataOptions
from modellego.kinds import Trained

__all__ = [
    "Assembled", "DataOptions", "Disassembled", "Heatmap", "ProfileInfo", "ProfileSampleCheck", "Trained", "assemble", "assembly",
    "assembly_base", "choose_calibration", "compare", "component", "component_metrics", "disassemble",
    "evaluate_file", "Exported", "export", "finetune", "heatmap", "import_model", "info", "own_split", "pareto_front", "profile", "profile_layers",
    "route", "run_demo", "scaled", "stored_training_data", "train", "union",
]

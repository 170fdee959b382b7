"""Step-DPO data generation: error collection, step localization, rectification (``python -m fasttrain.datagen``)."""
from fasttrain.datagen.judge import (
    BatchStepJudge,
    Localization,
    OpenAICompatibleJudge,
    RolloutJudge,
    StepJudge,
    first_wrong_step,
)
from fasttrain.datagen.pipeline import (
    DatagenConfig,
    WrongSolution,
    collect_errors,
    process_problem,
    process_problems,
    rectify,
    run_datagen,
)
from fasttrain.datagen.steps import SplitSolution, first_step, split_steps

__all__ = ["BatchStepJudge", "DatagenConfig", "Localization", "OpenAICompatibleJudge", "RolloutJudge",
           "SplitSolution", "StepJudge", "WrongSolution", "collect_errors", "first_step", "first_wrong_step",
           "process_problem", "process_problems", "rectify", "run_datagen", "split_steps"]

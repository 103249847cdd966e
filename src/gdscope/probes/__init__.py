"""Probes: measured quantities that declare what they need, which iterate and when they run."""

from gdscope.probes.base import At, Every, Iterate, LogSpaced, Probe, ProbeState, Schedule
from gdscope.probes.builtin import (
    AccuracyProbe,
    DistanceProbe,
    GradNormProbe,
    HessianTraceProbe,
    LossProbe,
    PreconditionedSharpnessProbe,
    SharpnessProbe,
    ThresholdProbe,
    default_probes,
)
from gdscope.probes.certificates import (
    BlockJacobianProbe,
    DataSeparationProbe,
    GradRatioProbe,
    LocalSmoothnessProbe,
    MarginProbe,
    ReluPatternProbe,
    SemiSmoothnessProbe,
    block_jacobian,
    data_separation,
    homogeneity_degree,
)
from gdscope.probes.edge import CatapultProbe, SelfStabilizationProbe
from gdscope.probes.kernel import (
    DisparityProbe,
    KernelAlignmentProbe,
    KernelDriftProbe,
    KernelProbe,
    NTKSpectrumProbe,
    PLProbe,
)

__all__ = [
    # API
    "Iterate",
    "Probe",
    "ProbeState",
    # schedules
    "At",
    "Every",
    "LogSpaced",
    "Schedule",
    # built-in probes
    "AccuracyProbe",
    "DistanceProbe",
    "GradNormProbe",
    "HessianTraceProbe",
    "LossProbe",
    "PreconditionedSharpnessProbe",
    "SharpnessProbe",
    "ThresholdProbe",
    "default_probes",
    # kernel probes
    "DisparityProbe",
    "KernelAlignmentProbe",
    "KernelDriftProbe",
    "KernelProbe",
    "NTKSpectrumProbe",
    "PLProbe",
    # certificate probes (THEORY §1, §4)
    "BlockJacobianProbe",
    "DataSeparationProbe",
    "GradRatioProbe",
    "LocalSmoothnessProbe",
    "MarginProbe",
    "ReluPatternProbe",
    "SemiSmoothnessProbe",
    "block_jacobian",
    "data_separation",
    "homogeneity_degree",
    # self-stabilization probes (THEORY §3)
    "CatapultProbe",
    "SelfStabilizationProbe",
]

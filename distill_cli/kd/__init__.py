"""Knowledge distillation: logit losses, feature methods, the objective and the teacher cache.

    distill-cli distill kd=dkd                 # a logit method (losses)
    distill-cli distill kd=fitnet              # a feature method (features) beside Hinton KD
    distill-cli distill stage.transfer_set=target stage.teacher_cache=true

``losses`` holds the logit terms as small pure functions, ``features`` the feature methods and
their adapters, ``crd`` CRD's memory banks, ``temperature`` CTKD's learned temperature,
``distillation`` the transfer set and the objective a distill stage trains with,
``teacher_cache`` the teacher outputs kept across epochs and jobs.
"""

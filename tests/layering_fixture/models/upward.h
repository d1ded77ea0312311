// Fixture for the layering_detects test: a model header that includes the trainer, which the
// layering check must reject.
#pragma once
#include "core/common.h"
#include "train/trainer.h"

// The C API that logquant binds: llama.cpp's public header and the logquant additions.
#include "llama.h"
#include "logquant.h"

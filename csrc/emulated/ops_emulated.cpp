// The ops again, as library ckd_ext_emulated in module ckd_ext._emulated.
#define CKD_LIBRARY ckd_ext_emulated
#define CKD_MODULE _emulated
#include "../ops.cpp"

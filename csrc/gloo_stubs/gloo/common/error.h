// Stub of Gloo's header (the torch wheel ships none): ProcessGroupGloo.hpp includes it but names
// nothing from it.
#pragma once
#include <stdexcept>

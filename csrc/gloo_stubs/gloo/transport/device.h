// Stub of Gloo's header (the torch wheel ships none): ProcessGroupGloo.hpp only holds these types
// behind smart pointers.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo

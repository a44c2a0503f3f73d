#ifndef STARLING_CLIBXML2_SHIM_H
#define STARLING_CLIBXML2_SHIM_H
// Debian's libxml2 is built with ICU and its headers then pull in the system's ICU headers, which clash
// with the ICU copy inside Foundation. We never touch the encoding handler struct whose layout the
// macro changes (only pointers to it), so hiding it is safe.
#include <libxml/xmlversion.h>
#undef LIBXML_ICU_ENABLED
#include <libxml/parser.h>
#include <libxml/parserInternals.h>
#include <libxml/SAX2.h>
#include <libxml/xmlerror.h>
#endif

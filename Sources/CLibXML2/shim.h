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
#include <libxml/dict.h>
#include <libxml/globals.h>

/// A push parser that is cheap to keep per connection: its input buffer starts at 1 KB instead of
/// 8 KB (it grows as needed), and its name dictionary is shared by every parser created on this thread
/// (one per event loop, so libxml2 never sees it from two threads). A fresh shared dictionary is started
/// once the current one holds `dict_limit` bytes, so names a client invents cannot grow it without
/// bound; parsers still using the old one keep it alive by reference count. Without these two, a parser
/// costs about 12 KB; with them about 3 KB.
static inline xmlParserCtxtPtr starling_create_push_parser(xmlSAXHandlerPtr sax, void *user_data, size_t dict_limit) {
    static __thread xmlDictPtr shared = NULL;
    if (shared != NULL && xmlDictGetUsage(shared) > dict_limit) {
        xmlDictFree(shared);
        shared = NULL;
    }
    if (shared == NULL) shared = xmlDictCreate();
    xmlDefaultBufferSize = 512;
    xmlParserCtxtPtr ctxt = xmlCreatePushParserCtxt(sax, user_data, NULL, 0, NULL);
    if (ctxt == NULL || shared == NULL) return ctxt;
    xmlDictFree(ctxt->dict);
    ctxt->dict = shared;
    xmlDictReference(shared);
    /* The parser compares these by pointer: they must come from the dictionary it now uses. */
    ctxt->str_xml = xmlDictLookup(shared, BAD_CAST "xml", 3);
    ctxt->str_xmlns = xmlDictLookup(shared, BAD_CAST "xmlns", 5);
    ctxt->str_xml_ns = xmlDictLookup(shared, XML_XML_NAMESPACE, 36);
    return ctxt;
}
#endif

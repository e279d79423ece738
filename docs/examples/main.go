package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"time"
)

const org = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"

func check(resp *http.Response, err error) {
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		log.Fatalf("HTTP %d: %s", resp.StatusCode, body)
	}
	fmt.Println(string(body))
}

func main() {
	// proxy form: the Transport sends Proxy-Authorization from the proxy URL's userinfo
	proxyURL, _ := url.Parse("http://acme:x@127.0.0.1:8080")
	client := &http.Client{
		Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)},
		Timeout:   30 * time.Second,
	}
	check(client.Get("http://online.miradore.com/acme/api/v2/Device"))

	// prefix form
	req, _ := http.NewRequest("GET", "http://127.0.0.1:8080/m3ter/organizations/"+org+"/meters", nil)
	req.Header.Set("x-sidekey-tenant", "acme")
	check((&http.Client{Timeout: 30 * time.Second}).Do(req))
}
